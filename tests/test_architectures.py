"""More RoPE architectures against the reference: qwen2 (q/k/v biases, NEOX rope), and smoke rows for the families
users run most (llama 3.1's frequency divisors, mistral's GQA and rope base, qwen3's q/k norms, phi3's fused
projections); and a refused one (gemma3 with a sliding window on every layer; interleaved: tests/test_gemma.py).

Bound: 1e-4 relative error (||a - b|| / ||b|| of all logits) with f32 weights, f32 KV cache, flash attention off,
as in test_attention_exact.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import open_exact, random_tokens, rel_err
from reference import RefModel, load_gguf
from tiny_models import write_tiny_gemma3, write_tiny_llama, write_tiny_phi3, write_tiny_qwen2, write_tiny_qwen3

import lminf_gguf

EXACT = 1e-4
G, L, C = 4, 16, 16
T = 3 * L + 7


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    path = write_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "qwen2.gguf", dtype="f32", n_head=4, n_head_kv=2,
                            seed=21)
    return path, load_gguf(path)


def _ref_logits(ref, tokens, mode):
    if mode == "vanilla":
        return ref.logits(tokens, mode="vanilla")
    return ref.logits(tokens, mode=mode, n_global=G, n_local=L, dist_max=C)


def test_reference_reads_qwen2(qwen2):
    _, ref = qwen2
    assert ref.hp.arch == "qwen2" and ref.hp.rope_type == "neox"
    assert "blk.0.attn_q.bias" in ref.t and "blk.1.attn_v.bias" in ref.t


def test_reference_still_reads_llama(tmp_path):
    ref = load_gguf(write_tiny_llama(tmp_path / "llama.gguf", seed=1))
    assert ref.hp.arch == "llama" and ref.hp.rope_type == "norm"
    assert not any(name.endswith(".bias") for name in ref.t)


def test_guards_the_qwen2_comparison(qwen2):
    """The comparison below can fail: NEOX vs NORM rope, the biases and the ceiling each move the logits far beyond
    the tolerance."""
    _, ref = qwen2
    tokens = random_tokens(T, seed=31)
    want = _ref_logits(ref, tokens, "lminf")

    norm = RefModel(dataclasses.replace(ref.hp, rope_type="norm"), ref.t)
    assert rel_err(_ref_logits(norm, tokens, "lminf"), want) > 100 * EXACT

    no_bias = RefModel(ref.hp, {k: v for k, v in ref.t.items() if not k.endswith(".bias")})
    assert rel_err(_ref_logits(no_bias, tokens, "lminf"), want) > 100 * EXACT

    assert rel_err(_ref_logits(ref, tokens, "mask"), want) > 100 * EXACT


@pytest.mark.parametrize("n_batch", [1, 7])
@pytest.mark.parametrize("mode", ["vanilla", "mask", "lminf"])
def test_qwen2_matches_reference(qwen2, mode, n_batch):
    path, ref = qwen2
    tokens = random_tokens(T, seed=31)
    if mode == "vanilla":
        llm = open_exact(path, "vanilla", n_ctx=64, n_batch=n_batch)
    else:
        llm = open_exact(path, mode, n_global=G, n_local=L, dist_max=C, n_batch=n_batch)
    err = rel_err(llm.logits(tokens), _ref_logits(ref, tokens, mode))
    print(f"qwen2 {mode} n_batch={n_batch}: relative error {err:.2e}")
    assert err <= EXACT, f"relative error {err:.2e}"


# ------------------------------------------------------------------------------------------ the popular families

FAMILIES = {
    # llama 3.x: llama graph, rope base 500000, llama 3.1's per-dimension frequency divisors (rope_freqs.weight)
    "llama3": lambda p: write_tiny_llama(p, rope_base=500000.0, rope_freqs=True, seed=41),
    # mistral: llama graph (GGUF arch llama), 4 query heads per KV head, rope base 1e6
    "mistral": lambda p: write_tiny_llama(p, n_head=8, n_head_kv=2, rope_base=1e6, seed=42),
    "qwen3": lambda p: write_tiny_qwen3(p, seed=43),
    "phi3": lambda p: write_tiny_phi3(p, seed=44),
}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, write in FAMILIES.items():
        path = write(root / f"{name}.gguf")
        out[name] = (path, load_gguf(path))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["vanilla", "mask", "lminf"])
def test_popular_families_match_the_reference(families, family, mode):
    path, ref = families[family]
    tokens = random_tokens(T, seed=51)
    if mode == "vanilla":
        llm = open_exact(path, "vanilla", n_ctx=64, n_batch=7)
    else:
        llm = open_exact(path, mode, n_global=G, n_local=L, dist_max=C, n_batch=7)
    err = rel_err(llm.logits(tokens), _ref_logits(ref, tokens, mode))
    llm.close()
    assert err <= EXACT, f"{family} {mode}: relative error {err:.2e}"


def test_the_family_features_are_guarded(families):
    """Each family's own feature moves the logits beyond 10x the tolerance (llama 3.1 divisors: 27x, over 55 tokens;
    q/k norms: more), so the rows above test it."""
    tokens = random_tokens(T, seed=51)
    for family, feature in (("llama3", "rope_freqs.weight"), ("qwen3", "attn_q_norm.weight")):
        _, ref = families[family]
        without = RefModel(ref.hp, {k: v for k, v in ref.t.items() if not k.endswith(feature)})
        assert rel_err(_ref_logits(without, tokens, "lminf"), _ref_logits(ref, tokens, "lminf")) > 10 * EXACT


# ----------------------------------------------------------------------------------------------------- refusal

@pytest.fixture(scope="module")
def gemma3_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    # a window on every layer (pattern 0): no global layer for LM-Infinite to extend (and bounded already)
    swa = write_tiny_gemma3(root / "gemma3-swa.gguf", sliding_window=8, sliding_window_pattern=0, seed=3)
    plain = write_tiny_gemma3(root / "gemma3-noswa.gguf", sliding_window=0, seed=3)
    return swa, plain


def _open(path, mode, **kw):
    return lminf_gguf.LMInfinite(path, mode=mode, n_global=G, n_local=L, dist_max=C, n_batch=7, n_threads=2,
                                 type_k="f32", type_v="f32", flash_attn=False, **kw)


@pytest.mark.parametrize("mode", ["lminf", "mask"])
def test_sliding_window_model_is_refused(gemma3_paths, mode):
    swa, _ = gemma3_paths
    # llama.cpp's refusal, in its words, as the caller's error (the model chosen)
    with pytest.raises(lminf_gguf.InvalidInputError, match="needs global attention layers.*'gemma3' is not supported"):
        _open(swa, mode)


def test_sliding_window_model_loads_in_vanilla(gemma3_paths):
    """The refusal is LM-Infinite's, not a broken file: llama.cpp loads and runs it unchanged."""
    swa, _ = gemma3_paths
    llm = _open(swa, "vanilla", n_ctx=64)
    out = llm.logits(random_tokens(20, seed=2))
    assert out.shape == (20, 96) and np.isfinite(out).all()


def test_same_architecture_without_sliding_window_is_accepted(gemma3_paths):
    """Control: gemma3 without its window layers uses the plain KV cache and is accepted, so the refusal above is
    due to the sliding-window layers, not to the architecture or the file."""
    _, plain = gemma3_paths
    out = _open(plain, "lminf").logits(random_tokens(20, seed=2))
    assert out.shape == (20, 96) and np.isfinite(out).all()
