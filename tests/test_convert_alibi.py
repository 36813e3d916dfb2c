"""`lminf convert` on the paper's ALiBi models (issue 13): tiny random Hugging Face MPT and BLOOM checkpoints written
here, converted with llama.cpp's converter, then checked

- against the Hugging Face model itself (float32), vanilla: bound 2e-3. llama.cpp's GELU is the tanh approximation
  read from an f16 table, MPT's (exact erf) and BLOOM's (tanh) are not rounded: measured 3.8e-4 (MPT) and 3.2e-4
  (BLOOM); the model without its ALiBi bias is off by > 0.1 (the guard below);
- against tests/reference.py on the converted file, lminf over 20 windows: 1e-4, the exactness bound.

MPT's tokenizer here is SentencePiece (its converter falls back to it); BLOOM's is a byte-level BPE trained here,
which the converter cannot recognise by hash, so it is converted with --pre-tokenizer bloom.
"""

from __future__ import annotations

import importlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import open_exact, random_tokens, rel_err
from reference import load_gguf

cv = importlib.import_module("lminf_gguf.convert")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")

HF_TOL = 2e-3
EXACT = 1e-4
N_CTX = 64
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "LM-Infinite reads long inputs with a bounded cache.",
             "Attention sinks keep the first tokens of the stream visible."] * 6


def _spm_tokenizer(root: Path) -> int:
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES), model_writer=proto, vocab_size=80,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2)
    (root / "tokenizer.model").write_bytes(proto.getvalue())
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return 80


def _bpe_tokenizer(root: Path) -> int:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>", "<unk>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>"}))
    return tok.get_vocab_size()


def _write_hf(root: Path, arch: str):
    root.mkdir(parents=True)
    torch.manual_seed(7)
    if arch == "mpt":
        n_vocab = _spm_tokenizer(root)
        config = transformers.MptConfig(d_model=64, n_heads=4, n_layers=2, expansion_ratio=4, max_seq_len=N_CTX,
                                        vocab_size=n_vocab, no_bias=True, layer_norm_epsilon=1e-5,
                                        attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": None},
                                        initializer_range=0.2)
        model = transformers.MptForCausalLM(config)
    else:
        n_vocab = _bpe_tokenizer(root)
        config = transformers.BloomConfig(vocab_size=n_vocab, hidden_size=64, n_layer=2, n_head=4,
                                          layer_norm_epsilon=1e-5, initializer_range=0.2, seq_length=N_CTX)
        model = transformers.BloomForCausalLM(config)
    with torch.no_grad():  # norms and biases away from their 1 / 0 initialisation, so that they are checked too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model = model.eval()
    model.save_pretrained(root, safe_serialization=True)
    return model, n_vocab  # float32: transformers' MPT cannot build its mask in float64


@pytest.fixture(scope="module", params=["mpt", "bloom"])
def converted(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"hf-{arch}") / arch
    model, n_vocab = _write_hf(root, arch)
    out = tmp_path_factory.mktemp(f"gguf-{arch}") / f"{arch}.gguf"
    cv.convert(root, out, outtype="f32", pre_tokenizer="bloom" if arch == "bloom" else None)

    def hf_logits(tokens):
        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long)).logits[0].numpy()

    return arch, out, hf_logits, n_vocab


def test_converted_matches_the_hugging_face_model(converted):
    arch, path, hf_logits, n_vocab = converted
    d = cv.describe(path)
    assert d["architecture"] == arch and d["lminf_supported"] and d["attention"] == "ALiBi", d
    tokens = random_tokens(48, seed=5, n_vocab=n_vocab)
    llm = open_exact(path, "vanilla", n_ctx=N_CTX, n_threads=1)
    got = llm.logits(tokens)
    llm.close()
    want = hf_logits(tokens)
    print(f"{arch}: llama.cpp vs Hugging Face {rel_err(got, want):.2e}")
    assert rel_err(got, want) < HF_TOL, rel_err(got, want)
    # guard: the model with the other position pattern (ALiBi off in the reference) is far off
    ref = load_gguf(path)
    assert rel_err(ref.logits(tokens, mode="vanilla"), want) < HF_TOL
    no_alibi = type(ref)(type(ref.hp)(**{**ref.hp.__dict__, "alibi_max_bias": 1e-9}), ref.t)
    assert rel_err(no_alibi.logits(tokens, mode="vanilla"), want) > 0.1


def test_lminf_on_the_converted_file_is_exact(converted):
    arch, path, _, n_vocab = converted
    ref = load_gguf(path)
    tokens = random_tokens(160, seed=6, n_vocab=n_vocab)
    llm = open_exact(path, "lminf", n_global=4, n_local=8, n_batch=16, n_threads=1)
    got = llm.logits(tokens)
    assert llm.cache_info()["rebases"] > 0
    llm.close()
    assert rel_err(got, ref.logits(tokens, mode="lminf", n_global=4, n_local=8)) < EXACT


def test_an_unrecognised_bpe_tokenizer_names_the_option(tmp_path):
    root = tmp_path / "bloom"
    _write_hf(root, "bloom")
    with pytest.raises(ValueError, match="--pre-tokenizer"):
        cv.convert(root, tmp_path / "out.gguf", outtype="f32")
    assert not (tmp_path / "out.gguf").exists()
