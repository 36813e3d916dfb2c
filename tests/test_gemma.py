"""Models with interleaved sliding-window layers (issue 13): tiny random gemma3 and gemma2 files (local layers with
their own window and rope base next to global layers; gemma2 with soft-capped scores and logits) against the
reference. LM-Infinite goes on the global layers (sinks,
window L, distance ceiling); the local layers keep their window; the whole cache stays bounded.

Bounds: 1e-4 (f32 weights and cache, flash attention off) and 2e-3 (f16 cache, flash attention on), as for llama.
Measured: gemma3 2.2e-5 and 1.0e-3, gemma2 2.0e-5 and 7.8e-4. The floor is ggml's table GELU in the GEGLU FFN (its
f16 rounding boundaries reached in float32 here, float64 in the reference: vanilla shows the same 2-3e-5), which
these peaky attention scores amplify; the model is kept at two layers (one local, one global) so that the floor
stays well under the bound.
"""

from __future__ import annotations

import pytest

from conftest import open_exact, random_tokens, rel_err
from reference import load_gguf
from tiny_models import write_tiny_gemma3

import lminf_gguf
from lminf_gguf.convert import describe

WINDOW = 8  # the local layers' sliding window


@pytest.fixture(scope="module", params=["gemma3", "gemma2"])
def gemma3(request, tmp_path_factory):
    """A tiny gemma3, or gemma2 (its soft caps made small, 3 and 5, so that they act on these scores)."""
    arch = request.param
    extra = dict(attn_softcap=3.0, final_softcap=5.0, seed=5) if arch == "gemma2" else dict(seed=3)
    path = write_tiny_gemma3(tmp_path_factory.mktemp(arch) / f"{arch}.gguf", arch=arch, n_layer=2,
                             sliding_window=WINDOW, sliding_window_pattern=2, rope_base=1e6, rope_base_swa=1e4,
                             qk_gain=2.0, **extra)
    return path, load_gguf(path)


def test_reference_reads_the_layer_pattern(gemma3):
    _, ref = gemma3
    assert [ref.is_local(il) for il in range(2)] == [True, False]
    assert ref.hp.swa_window == WINDOW and ref.hp.rope_base_swa == 1e4 and ref.hp.rope_base == 1e6


def test_vanilla_matches_the_reference(gemma3):
    path, ref = gemma3
    tokens = random_tokens(60, seed=2)
    llm = open_exact(path, "vanilla", n_ctx=64, n_batch=16, n_threads=1)
    assert rel_err(llm.logits(tokens), ref.logits(tokens, mode="vanilla")) < 1e-4


@pytest.mark.parametrize("mode", ["mask", "lminf"])
@pytest.mark.parametrize("g,l,n_batch,n_ubatch", [(4, 16, 16, 16), (1, 8, 8, 3), (10, 24, 32, 7)])
def test_lminf_on_the_global_layers_over_20_windows(gemma3, mode, g, l, n_batch, n_ubatch):
    """T = 20 L: the window is rebased (both caches shift; the local layers with their own rope base) and stays
    exact; the cells stay within G + L + ubatch for the global layers plus the local layers' own cache."""
    path, ref = gemma3
    tokens = random_tokens(20 * l, seed=g + l)
    kw = dict(n_global=g, n_local=l, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=1)
    if mode == "mask":
        kw["rebase_at"] = 1 << 20
    llm = open_exact(path, mode, **kw)
    got = llm.logits(tokens)
    info = llm.cache_info()
    llm.close()
    assert rel_err(got, ref.logits(tokens, mode=mode, n_global=g, n_local=l)) < 1e-4
    assert info["cells_swa"] > 0 and info["cells_used"] <= info["cells_bound"] == g + l + n_ubatch + info["cells_swa"]
    if mode == "lminf":
        assert info["rebases"] > 0


@pytest.mark.parametrize("kv,flash", [("f16", False), ("f32", True), ("f16", True)])
def test_flash_attention_and_f16_cache(gemma3, kv, flash):
    path, ref = gemma3
    tokens = random_tokens(320, seed=5)
    llm = open_exact(path, "lminf", kv=kv, flash_attn=flash, n_global=4, n_local=16, n_batch=16, n_threads=1)
    got = llm.logits(tokens)
    assert llm.cache_info()["flash_attn"] == flash
    llm.close()
    assert rel_err(got, ref.logits(tokens, mode="lminf", n_global=4, n_local=16)) < 2e-3


def test_guards(gemma3):
    """The comparisons above can fail: the ceiling, and LM-Infinite on the local layers too, each move the logits
    far beyond the bound."""
    path, ref = gemma3
    tokens = random_tokens(320, seed=5)
    want = ref.logits(tokens, mode="lminf", n_global=4, n_local=16)
    assert rel_err(ref.logits(tokens, mode="mask", n_global=4, n_local=16), want) > 1e-2
    everywhere = type(ref)(type(ref.hp)(**{**ref.hp.__dict__, "swa_window": 0}), ref.t)
    assert rel_err(everywhere.logits(tokens, mode="lminf", n_global=4, n_local=16), want) > 1e-2
    if ref.hp.attn_softcap:  # gemma2: the soft cap, the ceiling's scores included, matters
        uncapped = type(ref)(type(ref.hp)(**{**ref.hp.__dict__, "attn_softcap": 0.0}), ref.t)
        assert rel_err(uncapped.logits(tokens, mode="lminf", n_global=4, n_local=16), want) > 1e-2


def test_window_below_the_models_is_refused(gemma3):
    """(lminf-topk runs on these models since patch 0017, in the global layers: test_topk_iswa_alibi.py.)"""
    path, _ = gemma3
    with pytest.raises(lminf_gguf.InvalidInputError, match="below the model's sliding window"):
        open_exact(path, "lminf", n_global=4, n_local=WINDOW - 1, n_batch=4)
    d = describe(path)
    assert d["lminf_supported"] and "sliding-window" in d["attention"], d


def test_state_file_of_the_two_caches_resumes_exactly(gemma3, tmp_path):
    """save_state/load_state carry both caches (global and local layers): a resumed stream equals the unbroken one."""
    import numpy as np

    path, _ = gemma3
    tokens = [int(t) for t in random_tokens(200, seed=1)]
    kw = dict(n_global=4, n_local=16, n_batch=16, n_threads=1)
    a = open_exact(path, "lminf", **kw)
    list(a.eval(tokens[:150]))
    a.save_state(tmp_path / "s.lminf")
    want = a.logits(tokens)[150:]
    b = open_exact(path, "lminf", **kw)
    b.load_state(tmp_path / "s.lminf")
    got = np.concatenate([x.copy() for x in b.eval(tokens[150:], all_logits=True)])
    assert rel_err(got, want) < 1e-4
