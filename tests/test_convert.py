"""Hugging Face -> GGUF conversion (lminf_gguf.convert): a tiny random Hugging Face llama, converted with llama.cpp's
convert_hf_to_gguf.py, against the PyTorch model itself and against the project's reference; quantisation,
LM-Infinite metadata, describe(), the CLI parsers and the error cases.

Bounds, all ||a - b|| / ||b|| over every logit (conftest.rel_err):
- f32 GGUF, vanilla llama.cpp vs the Hugging Face model (float64): 1e-4, the suite's exactness bound for f32 weights
  and an f32 KV cache (measured ~1e-6). It checks the conversion itself: the q/k row permutation from Hugging Face's
  rotate-half RoPE to llama.cpp's adjacent pairs, tensor names and layout, norms, rope base.
- f32 GGUF, "lminf" mode vs tests/reference.py on the converted file: 1e-4.
- Quantised files are checked twice: against the Hugging Face model (the whole error) and against the float64
  reference run on the same file's dequantised weights (llama.cpp's own share: its quantised matrix products round
  the activations to Q8_0 too). This random model amplifies weight rounding about 4x (f16 weights alone give
  1.8e-3; measured over 4 token sequences):
  - Q8_0 (f16 conversion, then llama_model_quantize): vs PyTorch Q8_TOL = 0.1, measured 4.2e-2 to 4.5e-2, of which
    the weight rounding alone (reference on the dequantised weights vs PyTorch) is 3.9e-2: Q8_0 keeps one scale per
    32 weights and 8 bits, an rms rounding of ~0.5 % of a weight, ~17x f16's; vs the reference on the same file
    SAME_TOL = 0.06, measured 2.1e-2.
  - Q4_K_M from the f32 GGUF: vs PyTorch Q4_TOL = 0.5, measured 0.26 to 0.29 (these 64-wide rows are not a multiple
    of 256, so llama.cpp falls back to Q5_0 / Q8_0 for them, as it does for real models with such rows); vs the
    reference on the same file SAME_TOL, measured 2.9e-2.
  A conversion without the q/k permutation is off by 1.15 (the guards), 11x Q8_TOL.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import N_GPU_LAYERS, open_exact, random_tokens, rel_err
from reference import RefModel, load_gguf
from tiny_models import write_tiny_gemma3

import lminf_gguf

# the module, even if the package namespace ever exports a function of the same name
cv = importlib.import_module("lminf_gguf.convert")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip(
    "transformers", reason="transformers is needed to build the Hugging Face model (pip install transformers)")
spm = pytest.importorskip(
    "sentencepiece", reason="sentencepiece is needed for the tokenizer (pip install sentencepiece)")
pytest.importorskip("safetensors", reason="safetensors is needed to save the model (pip install safetensors)")

EXACT = 1e-4
Q8_TOL = 0.1
Q4_TOL = 0.5
SAME_TOL = 0.06
N_VOCAB, N_CTX = 96, 128
G, L, C = 4, 16, 16
T = 3 * L + 7

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "LM-Infinite reads long inputs with a bounded cache.",
    "Attention sinks keep the first tokens of the stream visible.",
    "A window of recent tokens follows each query.",
    "Rotary embeddings encode the relative position of two tokens.",
] * 4


def _write_hf_llama(root: Path, seed: int = 0):
    """A random LlamaForCausalLM saved as safetensors, with a SentencePiece tokenizer.model trained here."""
    root.mkdir(parents=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=proto, vocab_size=80,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    (root / "tokenizer.model").write_bytes(proto.getvalue())
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    torch.manual_seed(seed)
    # initializer_range 0.2: q/k scores of std ~2, a peaked softmax, so that positions and masks show in the logits
    config = transformers.LlamaConfig(
        vocab_size=N_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=N_CTX, rms_norm_eps=1e-5, rope_theta=10000.0,
        initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(root, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(Hugging Face model directory, its float64 logits function)."""
    root = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model = _write_hf_llama(root)
    model64 = model.to(torch.float64)

    def logits(tokens):
        with torch.no_grad():
            return model64(torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long)).logits[0].numpy()

    return root, logits


@pytest.fixture(scope="module")
def f32_gguf(hf, tmp_path_factory):
    root, _ = hf
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    assert cv.convert(root, out, outtype="f32") == str(out)
    return out


@pytest.fixture(scope="module")
def q8_gguf(hf, tmp_path_factory):
    root, _ = hf
    out = tmp_path_factory.mktemp("gguf-q8") / "tiny-q8_0.gguf"
    cv.convert(root, out, outtype="f16", quant="Q8_0", n_global=3, n_local=24, dist_max=20)
    return out


def _vanilla(path):
    return open_exact(path, "vanilla", n_ctx=N_CTX)


# ----------------------------------------------------------------------------------------------- exactness

def test_converted_f32_matches_pytorch(hf, f32_gguf):
    _, hf_logits = hf
    tokens = random_tokens(T, seed=5, n_vocab=N_VOCAB)
    want = hf_logits(tokens)
    err = rel_err(_vanilla(f32_gguf).logits(tokens), want)
    print(f"f32 GGUF vanilla vs PyTorch: relative error {err:.2e}")
    assert err <= EXACT, f"relative error {err:.2e}"


def test_reference_reads_the_conversion_and_guards_it(hf, f32_gguf):
    """The independent reference agrees with PyTorch on the converted file; with Hugging Face's rotate-half pairs
    instead of llama.cpp's adjacent pairs (a conversion without the q/k permutation) it is far off: the bound above
    can fail."""
    _, hf_logits = hf
    tokens = random_tokens(T, seed=5, n_vocab=N_VOCAB)
    want = hf_logits(tokens)
    ref = load_gguf(f32_gguf)
    assert rel_err(ref.logits(tokens, mode="vanilla"), want) <= EXACT
    unpermuted = RefModel(dataclasses.replace(ref.hp, rope_type="neox"), ref.t)
    assert rel_err(unpermuted.logits(tokens, mode="vanilla"), want) > 100 * EXACT


def test_lminf_on_converted_matches_reference(f32_gguf):
    tokens = random_tokens(T, seed=7, n_vocab=N_VOCAB)
    ref = load_gguf(f32_gguf)
    want = ref.logits(tokens, mode="lminf", n_global=G, n_local=L, dist_max=C)
    # guard: the Λ-mask and ceiling change these logits far beyond the bound
    assert rel_err(ref.logits(tokens, mode="vanilla"), want) > 100 * EXACT
    llm = open_exact(f32_gguf, "lminf", n_global=G, n_local=L, dist_max=C, n_batch=7)
    err = rel_err(llm.logits(tokens), want)
    print(f"f32 GGUF lminf vs reference: relative error {err:.2e}")
    assert err <= EXACT, f"relative error {err:.2e}"


def test_q8_0_within_tolerance_and_metadata(hf, q8_gguf):
    _, hf_logits = hf
    d = cv.describe(q8_gguf)
    assert d["tensor_types"].get("Q8_0", 0) >= 14  # 7 matrices per layer, plus the embeddings and output
    assert set(d["tensor_types"]) <= {"Q8_0", "F32"}
    assert d["lminf"] == {"lminf.n_global": 3, "lminf.n_local": 24, "lminf.dist_max": 20}
    tokens = random_tokens(T, seed=5, n_vocab=N_VOCAB)
    want = hf_logits(tokens)
    err = rel_err(_vanilla(q8_gguf).logits(tokens), want)
    ref = load_gguf(q8_gguf)
    same = rel_err(_vanilla(q8_gguf).logits(tokens), ref.logits(tokens))
    print(f"Q8_0 GGUF vanilla vs PyTorch: relative error {err:.2e}; vs the reference on the file {same:.2e}")
    assert err <= Q8_TOL, f"relative error {err:.2e}"
    assert same <= SAME_TOL, f"relative error {same:.2e} against the reference on the same file"
    # guard: a wrong conversion (rotate-half pairs) is far outside the Q8_0 tolerance
    assert rel_err(RefModel(dataclasses.replace(ref.hp, rope_type="neox"), ref.t).logits(tokens), want) > 5 * Q8_TOL
    # the stored defaults are LMInfinite's defaults
    llm = lminf_gguf.LMInfinite(str(q8_gguf), n_threads=2, n_gpu_layers=N_GPU_LAYERS)
    assert (llm.n_global, llm.n_local, llm.dist_max) == (3, 24, 20)


def test_q4_k_m_from_a_float_gguf(hf, f32_gguf, tmp_path):
    _, hf_logits = hf
    out = tmp_path / "tiny-q4_k_m.gguf"
    cv.convert(f32_gguf, out, quant="q4_k_m", n_local=32)
    d = cv.describe(out)
    assert d["file_type"] == "Q4_K_M" and not set(d["tensor_types"]) <= {"F32", "F16"}
    assert d["lminf"] == {"lminf.n_local": 32}
    tokens = random_tokens(T, seed=5, n_vocab=N_VOCAB)
    got = _vanilla(out).logits(tokens)
    err = rel_err(got, hf_logits(tokens))
    same = rel_err(got, load_gguf(out).logits(tokens))
    print(f"Q4_K_M GGUF vanilla vs PyTorch: relative error {err:.2e}; vs the reference on the file {same:.2e}; "
          f"types {d['tensor_types']}")
    assert err <= Q4_TOL, f"relative error {err:.2e}"
    assert same <= SAME_TOL, f"relative error {same:.2e} against the reference on the same file"
    with pytest.raises(ValueError, match="already quantised"):
        cv.convert(out, tmp_path / "again.gguf", quant="Q4_0")
    assert not (tmp_path / "again.gguf").exists()


# ----------------------------------------------------------------------------------------------- metadata

def test_describe_the_conversion(f32_gguf):
    d = cv.describe(f32_gguf)
    assert d["architecture"] == "llama" and d["context_length"] == N_CTX
    assert d["block_count"] == 2 and d["head_count"] == 4 and d["head_count_kv"] == 2
    assert d["vocab_size"] == N_VOCAB and d["rope"]["freq_base"] == pytest.approx(10000.0)
    assert d["tensor_types"] == {"F32": d["n_tensors"]} and d["n_tensors"] == 2 * 9 + 3
    assert d["lminf"] == {} and d["lminf_supported"] and d["lminf_reason"] is None


def test_set_metadata_round_trip(f32_gguf, tmp_path):
    path = tmp_path / "meta.gguf"
    shutil.copy(f32_gguf, path)
    tokens = random_tokens(20, seed=3, n_vocab=N_VOCAB)
    before = _vanilla(path).logits(tokens)

    keys = cv.set_metadata(path, {"lminf.n_global": 6, "lminf.n_local": 40, "lminf.dist_max": 33})
    assert keys == {"lminf.n_global": 6, "lminf.n_local": 40, "lminf.dist_max": 33}
    assert cv.describe(path)["lminf"] == keys
    assert [p.name for p in tmp_path.iterdir()] == ["meta.gguf"]  # no temporary file left
    llm = lminf_gguf.LMInfinite(str(path), n_threads=2, n_gpu_layers=N_GPU_LAYERS)
    assert (llm.n_global, llm.n_local, llm.dist_max) == (6, 40, 33)
    llm.close()
    # tensors copied unchanged
    np.testing.assert_array_equal(_vanilla(path).logits(tokens), before)

    assert cv.set_metadata(path, {"lminf.dist_max": None, "lminf.n_global": 0}) == {
        "lminf.n_global": 0, "lminf.n_local": 40}
    llm = lminf_gguf.LMInfinite(str(path), n_threads=2, n_gpu_layers=N_GPU_LAYERS)
    assert (llm.n_global, llm.n_local, llm.dist_max) == (0, 40, 40)
    llm.close()

    for bad, match in (({"lminf.n_local": 0}, "n_local must be an integer >= 1"),
                       ({"lminf.window": 3}, "unknown LM-Infinite key"),
                       ({"lminf.n_global": -1}, "n_global must be"), ({}, "nothing to set")):
        with pytest.raises(ValueError, match=match):
            cv.set_metadata(path, bad)
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        cv.set_metadata(tmp_path / "missing.gguf", {"lminf.n_global": 1})


def test_describe_refuses_what_the_engine_refuses(tmp_path):
    swa = cv.describe(write_tiny_gemma3(tmp_path / "swa.gguf", sliding_window=8, sliding_window_pattern=2))
    assert swa["architecture"] == "gemma3" and swa["lminf_supported"]  # LM-Infinite on its global layers
    assert "interleaved sliding-window" in swa["attention"]
    plain = cv.describe(write_tiny_gemma3(tmp_path / "plain.gguf", sliding_window=0))
    assert plain["lminf_supported"], plain["lminf_reason"]
    # the rules on keys and architecture names
    assert "recurrent" in cv._support("mamba", {})
    assert "hybrid" in cv._support("jamba", {})
    assert "non-causal" in cv._support("bert", {}) and "non-causal" in cv._support("llama", {
        "llama.attention.causal": False})
    assert "RoPE" in cv._support("gpt2", {}) and "ALiBi" in cv._support("gpt2", {})
    assert "no graph" in cv._support("gptj", {})
    assert cv._support("bloom", {}) is None and cv._support("mpt", {"mpt.attention.max_alibi_bias": 8.0}) is None
    assert "without ALiBi" in cv._support("mpt", {})
    assert "position embeddings" in cv._support("mpt", {"mpt.attention.max_alibi_bias": 8.0},
                                                {"position_embd.weight"})
    assert cv.attention_kind("bloom", {}) == "ALiBi"
    assert cv.attention_kind("llama", {}) == "RoPE"
    assert "sliding-window" in cv.attention_kind("gemma3", {"gemma3.attention.sliding_window": 512,
                                                            "gemma3.attention.sliding_window_pattern": 6})
    assert cv._support("gemma2", {}) is None  # interleaved: LM-Infinite on the global layers
    assert "every layer" in cv._support("gemma3n", {})
    assert "every layer" in cv._support("mistral3", {"mistral3.attention.sliding_window": 4096})
    assert "M-RoPE" in cv._support("qwen2vl", {"qwen2vl.rope.dimension_sections": [16, 24, 24, 0]})
    assert "MLA" in cv._support("deepseek2", {"deepseek2.attention.kv_lora_rank": 512})
    assert cv._support("qwen2", {"qwen2.attention.sliding_window": 0}) is None


def test_print_info(f32_gguf, capsys):
    cv.print_info(f32_gguf)
    out = capsys.readouterr().out
    assert "architecture:     llama" in out and f"trained context:  {N_CTX}" in out
    assert "LM-Infinite:      supported" in out and "F32 21" in out


# ----------------------------------------------------------------------------------------------- errors

def _copy_hf(hf, dest: Path) -> Path:
    root, _ = hf
    shutil.copytree(root, dest)
    return dest


def _listing(d: Path):
    return sorted(p.name for p in d.iterdir())


def test_missing_config(hf, tmp_path):
    src = _copy_hf(hf, tmp_path / "src")
    (src / "config.json").unlink()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json \(not a Hugging Face model directory\)"):
        cv.convert(src, out_dir / "m.gguf")
    assert _listing(out_dir) == []
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        cv.convert(tmp_path / "nowhere", out_dir / "m.gguf")


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors(hf, tmp_path, damage):
    src = _copy_hf(hf, tmp_path / "src")
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"{not json" + data[17:])
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous file")
    with pytest.raises(ValueError, match="model.safetensors: corrupt or partial safetensors file"):
        cv.convert(src, out)
    assert out.read_bytes() == b"previous file"  # an existing output is untouched
    assert _listing(tmp_path) == ["m.gguf", "src"]


def test_missing_shard(hf, tmp_path):
    src = _copy_hf(hf, tmp_path / "src")
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors: listed in"):
        cv.convert(src, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_unwritable_output(hf, tmp_path):
    root, _ = hf
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="is not a directory"):
        cv.convert(root, blocker / "m.gguf")
    with pytest.raises(OSError, match="does not exist"):
        cv.convert(root, tmp_path / "no" / "m.gguf")
    with pytest.raises(OSError, match="it is a directory"):
        cv.convert(root, tmp_path)
    assert _listing(tmp_path) == ["file"]


def test_unknown_architecture(hf, tmp_path):
    """Rejected by llama.cpp's converter (a subprocess): one clear line, no output, no temporary file."""
    src = _copy_hf(hf, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["TinyMadeUpForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(ValueError, match="unknown architecture TinyMadeUpForCausalLM") as e:
        cv.convert(src, out_dir / "m.gguf", quant="Q4_0")
    assert "\n" not in str(e.value)
    assert _listing(out_dir) == []


def test_bad_arguments(hf, tmp_path):
    root, _ = hf
    for kw, match in ((dict(outtype="q4"), "unknown outtype"), (dict(quant="Q3_K"), "unknown quantisation"),
                      (dict(outtype="q8_0", quant="Q4_0"), "starts from a float file"),
                      (dict(n_local=0), "n_local must be an integer >= 1")):
        with pytest.raises(ValueError, match=match):
            cv.convert(root, tmp_path / "m.gguf", **kw)
    assert _listing(tmp_path) == []


# ----------------------------------------------------------------------------------------------- hub, CLI

def test_hub_repo_id_from_the_offline_cache(hf, tmp_path, monkeypatch):
    """A repo id resolves through huggingface_hub's cache with HF_HUB_OFFLINE; a repo not cached fails clearly."""
    constants = pytest.importorskip("huggingface_hub").constants
    root, _ = hf
    cache = tmp_path / "hub"
    repo = cache / "models--tiny--llama"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(root, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = cv._resolve_source("tiny/llama")
    assert resolved == repo / "snapshots" / commit and cv._check_model_dir(resolved) == "LlamaForCausalLM"
    with pytest.raises(FileNotFoundError, match="not-cached/model: cannot fetch from the Hugging Face hub") as e:
        cv._resolve_source("not-cached/model")
    assert "\n" not in str(e.value)


def _parser():
    ap = argparse.ArgumentParser(prog="lminf")
    cv.add_parsers(ap.add_subparsers(dest="command", required=True))
    return ap


def test_cli_parsers(f32_gguf, tmp_path, capsys):
    ap = _parser()
    for cmd in ("convert", "meta"):
        with pytest.raises(SystemExit) as e:
            ap.parse_args([cmd, "--help"])
        assert e.value.code == 0
    assert "--quant" in capsys.readouterr().out
    args = ap.parse_args(["convert", "src", "-o", "x.gguf", "--quant", "q4_k_m", "--n-global", "4"])
    assert (args.quant, args.n_global, args.outtype, args.func) == ("Q4_K_M", 4, "f16", cv._cmd_convert)

    path = tmp_path / "cli.gguf"
    shutil.copy(f32_gguf, path)
    args = ap.parse_args(["meta", str(path), "--set", "lminf.n_global=7", "--set", "n_local=50"])
    assert args.func(args) == 0
    assert cv.describe(path)["lminf"] == {"lminf.n_global": 7, "lminf.n_local": 50}
    args = ap.parse_args(["meta", str(path)])
    assert args.func(args) == 0 and "lminf.n_global = 7" in capsys.readouterr().out
    for bad in ("lminf.n_global", "lminf.n_local=-3", "general.name=x"):
        args = ap.parse_args(["meta", str(path), "--set", bad])
        with pytest.raises(ValueError):
            args.func(args)


def test_converter_is_found():
    tree = cv.converter_dir()
    assert (tree / "convert_hf_to_gguf.py").is_file() and (tree / "gguf-py" / "gguf" / "gguf_writer.py").is_file()
    if not os.environ.get("LMINF_CONVERTER_DIR") and "site-packages" in cv.__file__:
        assert tree == Path(cv.__file__).resolve().parent / "_convert"  # shipped with the install


def test_info_of_a_vocabulary_only_file(f32_gguf, tmp_path, capsys):
    """A GGUF with metadata and no tensors (llama.cpp's vocab-only files) cannot run: info says so."""
    import gguf

    r = gguf.GGUFReader(f32_gguf)
    w = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "llama")
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        w.add_key_value(name, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY
                        else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cv.print_info(str(tmp_path / "vocab.gguf"))
    out = capsys.readouterr().out
    assert "LM-Infinite:      not supported" in out and "no tensors" in out


def test_a_killed_writers_temporary_file_is_removed_by_the_next_writer(f32_gguf, tmp_path):
    """SIGKILL leaves no chance to clean up: the temporary file carries its process id, and the next write in the
    same directory removes it once that process is gone (a ~98 MB hidden file after a killed `meta --set`)."""
    import subprocess
    import sys

    from lminf_gguf.files import temp_next_to

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".lminf-meta-p{dead.pid}-x1.tmp"
    stale.write_bytes(b"partial")
    alive = tmp_path / f".lminf-meta-p{os.getppid()}-x2.tmp"   # a writer that still runs: left alone
    alive.write_bytes(b"in progress")
    out = tmp_path / "model.gguf"
    shutil.copy(f32_gguf, out)
    cv.set_metadata(out, {"lminf.n_local": 64})
    assert not stale.exists() and alive.exists()
    t = temp_next_to(out, "state")
    assert t.parent == tmp_path and f"-p{os.getpid()}-" in t.name
    t.unlink()
