"""LM-Infinite attention in the patched llama.cpp against the independent PyTorch reference (tests/reference.py).

Bounds (relative error ||a - b|| / ||b|| of all logits): 1e-4 with f32 weights, f32 KV cache and flash attention
off (unpatched llama.cpp reaches ~3e-7 there); 2e-3 with an f16 KV cache, flash attention (which casts K and V to
f16), or f16 weights (ggml rounds activations to f16 in those matmuls).
"""

from __future__ import annotations

import pytest

from conftest import open_exact, random_tokens, rel_err

EXACT = 1e-4
HALF = 2e-3


@pytest.mark.parametrize("n_local", [16, 64])
@pytest.mark.parametrize("n_global", [0, 1, 4, 10])
@pytest.mark.parametrize("n_ubatch", [1, 7, 64])
@pytest.mark.parametrize("mode", ["lminf", "mask"])
def test_grid_matches_reference(tiny_model, mode, n_ubatch, n_global, n_local):
    path, ref = tiny_model("f32-gqa2")
    llm = open_exact(path, mode, n_global=n_global, n_local=n_local, dist_max=n_local, n_batch=n_ubatch)
    for T in (n_local - 1, n_local, n_local + 1, 3 * n_local + 7):
        tokens = random_tokens(T, seed=T + 100 * n_global)
        want = ref.logits(tokens, mode=mode, n_global=n_global, n_local=n_local, dist_max=n_local)
        err = rel_err(llm.logits(tokens), want)
        assert err <= EXACT, f"T={T}: relative error {err:.2e}"


def test_ceiling_changes_the_result(tiny_model):
    """Guards the grid above: on these models the ceiling moves logits far beyond the tolerance."""
    _, ref = tiny_model("f32-gqa2")
    tokens = random_tokens(3 * 16 + 7)
    assert rel_err(ref.logits(tokens, mode="lminf", n_global=4, n_local=16, dist_max=16),
                   ref.logits(tokens, mode="mask", n_global=4, n_local=16)) > 100 * EXACT


@pytest.mark.parametrize("name", ["f32-mha", "f32-gqa8", "f32-linear4", "f32-yarn2"])
@pytest.mark.parametrize("mode", ["lminf", "mask"])
def test_architectures_match_reference(tiny_model, name, mode):
    path, ref = tiny_model(name)
    tokens = random_tokens(3 * 16 + 7, seed=5)
    llm = open_exact(path, mode, n_global=4, n_local=16, dist_max=16, n_batch=7)
    want = ref.logits(tokens, mode=mode, n_global=4, n_local=16, dist_max=16)
    assert rel_err(llm.logits(tokens), want) <= EXACT


@pytest.mark.parametrize("dist_max", [8, 16, 40])
def test_dist_max_other_than_window(tiny_model, dist_max):
    path, ref = tiny_model("f32-gqa2")
    tokens = random_tokens(70, seed=9)
    llm = open_exact(path, "lminf", n_global=4, n_local=16, dist_max=dist_max, n_batch=16)
    want = ref.logits(tokens, mode="lminf", n_global=4, n_local=16, dist_max=dist_max)
    assert rel_err(llm.logits(tokens), want) <= EXACT


def test_vanilla_is_full_attention(tiny_model):
    path, ref = tiny_model("f32-gqa2")
    tokens = random_tokens(55, seed=3)
    llm = open_exact(path, "vanilla", n_ctx=64, n_batch=7)
    assert rel_err(llm.logits(tokens), ref.logits(tokens, mode="vanilla")) <= EXACT


@pytest.mark.parametrize("mode", ["lminf", "mask"])
def test_f16_kv_cache(tiny_model, mode):
    path, ref = tiny_model("f32-gqa2")
    tokens = random_tokens(55, seed=4)
    llm = open_exact(path, mode, kv="f16", n_global=4, n_local=16, dist_max=16, n_batch=7)
    want = ref.logits(tokens, mode=mode, n_global=4, n_local=16, dist_max=16)
    assert rel_err(llm.logits(tokens), want) <= HALF


def test_mask_with_flash_attention(tiny_model):
    path, ref = tiny_model("f32-gqa2")
    tokens = random_tokens(55, seed=6)
    llm = open_exact(path, "mask", kv="f16", flash_attn=True, n_global=4, n_local=16, n_batch=7)
    want = ref.logits(tokens, mode="mask", n_global=4, n_local=16)
    assert rel_err(llm.logits(tokens), want) <= HALF


@pytest.mark.parametrize("n_local", [16, 64])
@pytest.mark.parametrize("n_global", [0, 1, 4, 10])
@pytest.mark.parametrize("n_ubatch", [1, 7, 64])
@pytest.mark.parametrize("mode", ["lminf", "mask"])
def test_flash_grid_matches_reference(tiny_model, mode, n_ubatch, n_global, n_local):
    """The ceiling inside flash attention (a bias of the sink columns): the grid above, up to 20 L (rebasing)."""
    path, ref = tiny_model("f32-gqa2")
    llm = open_exact(path, mode, kv="f16", flash_attn=True, n_global=n_global, n_local=n_local, dist_max=n_local,
                     n_batch=n_ubatch)
    assert llm.cache_info()["flash_attn"] is True
    for T in (n_local - 1, n_local + 1, 3 * n_local + 7, 20 * n_local):
        tokens = random_tokens(T, seed=T + 100 * n_global)
        want = ref.logits(tokens, mode=mode, n_global=n_global, n_local=n_local, dist_max=n_local)
        err = rel_err(llm.logits(tokens), want)
        assert err <= HALF, f"T={T}: relative error {err:.2e}"
    if mode == "lminf":
        assert llm.cache_info()["rebases"] > 0


@pytest.mark.parametrize("n_batch", [1, 7, 64])
def test_flash_attention_applies_the_ceiling(tiny_model, n_batch):
    """Guards the flash grid: its output is the ceiling's, far from the Λ-mask alone (the same flash path)."""
    path, ref = tiny_model("f32-gqa2")
    tokens = random_tokens(3 * 16 + 7, seed=7)
    llm = open_exact(path, "lminf", kv="f16", flash_attn=True, n_global=4, n_local=16, dist_max=16, n_batch=n_batch)
    got = llm.logits(tokens)
    assert rel_err(got, ref.logits(tokens, mode="lminf", n_global=4, n_local=16, dist_max=16)) <= HALF
    assert rel_err(got, ref.logits(tokens, mode="mask", n_global=4, n_local=16)) > 10 * HALF


@pytest.mark.parametrize("n_batch", [1, 64])
def test_flash_attention_long_window(tiny_model, n_batch):
    """A window of 520: single-token decode takes the CPU's split-KV flash kernel (n_kv >= 512), batches the tiled
    one; both carry the sink bias."""
    path, ref = tiny_model("f32-gqa2")
    tokens = random_tokens(1100, seed=3)
    llm = open_exact(path, "lminf", kv="f16", flash_attn=True, n_global=4, n_local=520, dist_max=520, n_batch=n_batch)
    want = ref.logits(tokens, mode="lminf", n_global=4, n_local=520, dist_max=520)
    assert rel_err(llm.logits(tokens), want) <= HALF


@pytest.mark.parametrize("name", ["f32-mha", "f32-gqa8", "f32-linear4", "f32-yarn2"])
def test_flash_architectures_match_reference(tiny_model, name):
    path, ref = tiny_model(name)
    tokens = random_tokens(3 * 16 + 7, seed=5)
    llm = open_exact(path, "lminf", kv="f16", flash_attn=True, n_global=4, n_local=16, dist_max=16, n_batch=7)
    want = ref.logits(tokens, mode="lminf", n_global=4, n_local=16, dist_max=16)
    assert rel_err(llm.logits(tokens), want) <= HALF


def test_flash_attention_is_the_default(tiny_model):
    """flash_attn=None: llama.cpp picks flash attention on the CPU, with the ceiling too; off when asked."""
    path, _ = tiny_model("f32-gqa2")
    assert open_exact(path, "lminf", flash_attn=None, n_local=16).cache_info()["flash_attn"] is True
    assert open_exact(path, "lminf", flash_attn=False, n_local=16).cache_info()["flash_attn"] is False


def test_f16_weights(tiny_model):
    path, ref = tiny_model("f16-gqa2")
    tokens = random_tokens(55, seed=8)
    llm = open_exact(path, "lminf", n_global=4, n_local=16, dist_max=16, n_batch=7)
    want = ref.logits(tokens, mode="lminf", n_global=4, n_local=16, dist_max=16)
    assert rel_err(llm.logits(tokens), want) <= HALF


def test_decode_equals_prefill(tiny_model):
    """Token-by-token decode and one batched prefill give the same logits per query."""
    path, _ = tiny_model("f32-gqa2")
    tokens = random_tokens(80, seed=11)
    one = open_exact(path, "lminf", n_global=4, n_local=16, n_batch=1).logits(tokens)
    batched = open_exact(path, "lminf", n_global=4, n_local=16, n_batch=64).logits(tokens)
    assert rel_err(one, batched) <= EXACT
