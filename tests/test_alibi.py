"""The paper's ALiBi models (issue 13): tiny random MPT and BLOOM files against the independent reference, in every
mode, several G, L, C and ubatch sizes, streams of 20L (rebasing), flash attention on and off; conversion of tiny
Hugging Face MPT and BLOOM checkpoints."""

from __future__ import annotations

import pytest

from conftest import open_exact, random_tokens, rel_err
from reference import load_gguf
from tiny_models import write_tiny_alibi

import lminf_gguf
from lminf_gguf.convert import describe

ARCHS = ("mpt", "bloom")


@pytest.fixture(scope="module")
def alibi_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("alibi")
    out = {}
    for i, arch in enumerate(ARCHS):
        path = write_tiny_alibi(root / f"{arch}.gguf", arch=arch, seed=10 + i)
        out[arch] = (path, load_gguf(path))
    return out


def _compare(path, ref, mode, tokens, *, kv="f32", flash=False, **kw):
    llm = open_exact(path, mode, kv=kv, flash_attn=flash, n_threads=1, **kw)
    try:
        got = llm.logits(tokens)
        info = llm.cache_info()
    finally:
        llm.close()
    ref_kw = {k: kw[k] for k in ("n_global", "n_local", "dist_max") if k in kw}
    want = ref.logits(tokens, mode=mode, **ref_kw)
    return rel_err(got, want), info


@pytest.mark.parametrize("arch", ARCHS)
def test_vanilla_matches_the_reference(alibi_models, arch):
    path, ref = alibi_models[arch]
    err, _ = _compare(path, ref, "vanilla", random_tokens(60, seed=1), n_batch=16)
    assert err < 1e-4, err


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode,g,l,c,n_batch,n_ubatch", [
    ("mask", 4, 8, None, 16, 16),
    ("lminf", 4, 8, None, 16, 16),
    ("lminf", 2, 16, None, 32, 7),
    ("lminf", 4, 8, 24, 8, 8),      # C > L: sinks beyond the window at 24
    ("lminf", 1, 12, 5, 16, 1),     # C < L: window keys keep their true distance
])
def test_lminf_over_20_windows_matches_the_reference(alibi_models, arch, mode, g, l, c, n_batch, n_ubatch):
    """T = 20 L: the window is rebased several times (no K-shift for ALiBi) and stays exact."""
    path, ref = alibi_models[arch]
    kw = dict(n_global=g, n_local=l, n_batch=n_batch, n_ubatch=n_ubatch)
    if c is not None:
        kw["dist_max"] = c
    if mode == "mask":
        kw["rebase_at"] = 1 << 20  # mask mode: sinks keep their true distance (no rebase within the test)
    err, info = _compare(path, ref, mode, random_tokens(20 * l, seed=g + l), **kw)
    assert err < 1e-4, err
    assert info["cells_used"] <= info["cells_bound"] == g + l + n_ubatch
    if mode == "lminf":
        assert info["rebases"] > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kv,flash", [("f16", False), ("f32", True), ("f16", True)])
def test_lminf_flash_attention_and_f16_cache(alibi_models, arch, kv, flash):
    """The ceiling lives in the mask, which flash attention takes too: flash on is the same LM-Infinite."""
    path, ref = alibi_models[arch]
    err, info = _compare(path, ref, "lminf", random_tokens(160, seed=7), kv=kv, flash=flash, n_global=4,
                         n_local=8, n_batch=16)
    assert info["flash_attn"] == flash
    assert err < 2e-3, err


def test_the_ceiling_is_what_makes_it_exact(alibi_models):
    """Guard: the same stream compared with the ceiling-less reference ("mask") must fail the tolerance."""
    path, ref = alibi_models["mpt"]
    tokens = random_tokens(160, seed=7)
    llm = open_exact(path, "lminf", n_global=4, n_local=8, n_batch=16, n_threads=1)
    got = llm.logits(tokens)
    llm.close()
    assert rel_err(got, ref.logits(tokens, mode="lminf", n_global=4, n_local=8)) < 1e-4
    assert rel_err(got, ref.logits(tokens, mode="mask", n_global=4, n_local=8)) > 1e-2


def test_alibi_with_learned_positions_is_refused(alibi_models, tmp_path):
    """(lminf-topk runs on ALiBi models since patch 0017: test_topk_iswa_alibi.py.)"""
    learned = write_tiny_alibi(tmp_path / "mpt-pos.gguf", arch="mpt", pos_embd=True)
    with pytest.raises(lminf_gguf.InvalidInputError, match="learned absolute position embeddings"):
        lminf_gguf.LMInfinite(learned, n_local=8, n_batch=8, n_threads=1)
    assert "position embeddings" in describe(learned)["lminf_reason"]
    # lminf info's verdict agrees with the engine on the supported ones
    for arch in ARCHS:
        d = describe(alibi_models[arch][0])
        assert d["lminf_supported"] and d["attention"] == "ALiBi", d
