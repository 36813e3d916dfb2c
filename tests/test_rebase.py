"""Position rebasing: the window is moved down once positions pass rebase_at; results do not change.

A stream of 20 windows with the smallest allowed rebase_at rebases many times; it must agree with the same stream
without rebasing (and with the reference), and llama.cpp never sees a position above rebase_at. Since positions
inside llama.cpp stay bounded, a stream of 2^24 or 2^31+ tokens reaches llama.cpp with the same small positions.
"""

from __future__ import annotations

import pytest

from conftest import open_exact, random_tokens, rel_err

from lminf_gguf._lib import llama_raw


@pytest.mark.parametrize("name", ["f32-gqa2", "f32-yarn2"])
@pytest.mark.parametrize("n_batch", [1, 7])
def test_rebased_stream_equals_unrebased(tiny_model, name, n_batch):
    path, ref = tiny_model(name)
    g, l = 4, 16
    tokens = random_tokens(20 * l, seed=31)
    never = open_exact(path, "lminf", n_global=g, n_local=l, n_batch=n_batch, rebase_at=1 << 30)
    often = open_exact(path, "lminf", n_global=g, n_local=l, n_batch=n_batch, rebase_at=1)

    a = never.logits(tokens)
    often.reset()
    rows = []
    rebase_at = g + l + n_batch  # rebase_at=1 is raised to the smallest workable value
    for block in often.eval(tokens, all_logits=True):
        rows.extend(block.copy())
        pos_max = llama_raw.llama_memory_seq_pos_max(llama_raw.llama_get_memory(often.ctx), 0)
        assert pos_max < rebase_at
    assert never.cache_info()["rebases"] == 0
    assert often.cache_info()["rebases"] >= 10
    assert often.cache_info()["n_tokens"] == len(tokens)

    assert rel_err(rows, a) <= 1e-4
    assert rel_err(rows, ref.logits(tokens, mode="lminf", n_global=g, n_local=l, dist_max=l)) <= 1e-4


def test_default_rebase_point(tiny_model):
    path, _ = tiny_model("f32-gqa2")
    llm = open_exact(path, "lminf", n_global=4, n_local=16, n_batch=8)
    llm.logits(random_tokens(200))
    info = llm.cache_info()
    assert info["rebases"] > 0 and info["position"] <= 4 + 2 * 16 + 8


@pytest.mark.parametrize("n_batch", [1, 7])
def test_rebased_stream_with_flash_attention(tiny_model, n_batch):
    """The same with the ceiling inside flash attention (f16 K/V there, so the f16 bound)."""
    path, ref = tiny_model("f32-yarn2")
    g, l = 4, 16
    tokens = random_tokens(20 * l, seed=32)
    never = open_exact(path, "lminf", kv="f16", flash_attn=True, n_global=g, n_local=l, n_batch=n_batch,
                       rebase_at=1 << 30)
    often = open_exact(path, "lminf", kv="f16", flash_attn=True, n_global=g, n_local=l, n_batch=n_batch, rebase_at=1)
    a, b = never.logits(tokens), often.logits(tokens)
    assert often.cache_info()["rebases"] >= 10 and often.cache_info()["flash_attn"]
    assert rel_err(b, a) <= 2e-3
    assert rel_err(b, ref.logits(tokens, mode="lminf", n_global=g, n_local=l, dist_max=l)) <= 2e-3
