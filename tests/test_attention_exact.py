"""LM-Infinite attention in the patched llama.cpp against the independent PyTorch reference (tests/reference.py).

Bounds (relative error ||a - b|| / ||b|| of all logits): 1e-4 with f32 weights, f32 KV cache and flash attention
off (unpatched llama.cpp reaches ~3e-7 there); 2e-3 with an f16 KV cache, flash attention, or f16 weights (ggml
rounds activations to f16 in those matmuls).
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


def test_lminf_turns_flash_attention_off_and_stays_exact(tiny_model):
    path, ref = tiny_model("f32-gqa2")
    tokens = random_tokens(55, seed=7)
    llm = open_exact(path, "lminf", flash_attn=True, n_global=4, n_local=16, dist_max=16, n_batch=7)
    want = ref.logits(tokens, mode="lminf", n_global=4, n_local=16, dist_max=16)
    assert rel_err(llm.logits(tokens), want) <= EXACT


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
