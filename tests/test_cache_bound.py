"""The LM-Infinite KV cache stays within G + L + n_ubatch cells however long the stream, and stays exact."""

from __future__ import annotations

import pytest

from conftest import open_exact, random_tokens, rel_err


@pytest.mark.parametrize("mode", ["lminf", "mask"])
@pytest.mark.parametrize("n_batch", [1, 7, 64])
def test_cells_bounded_over_20_windows(tiny_model, mode, n_batch):
    path, ref = tiny_model("f32-gqa2")
    g, l = 4, 16
    bound = g + l + n_batch
    tokens = random_tokens(max(20 * l, 10 * bound + l), seed=21)  # at least 20 windows and 10 times the cells
    llm = open_exact(path, mode, n_global=g, n_local=l, dist_max=l, n_batch=n_batch)
    assert llm.cache_info()["cells_total"] == bound

    llm.reset()
    peak = 0
    rows = []
    for block in llm.eval(tokens, all_logits=True):
        rows.extend(block.copy())
        peak = max(peak, llm.cache_info()["cells_used"])
        assert llm.cache_info()["cells_used"] <= bound
    # the cache filled up to its bound (less the one cell of a window whose oldest token already left) and the ring
    # buffer really wrapped: ten times more tokens than cells went through it
    assert bound - 1 <= peak <= bound, (peak, bound)
    assert llm.cache_info()["n_tokens"] == len(tokens) > 10 * bound

    want = ref.logits(tokens, mode=mode, n_global=g, n_local=l, dist_max=l)
    assert rel_err(rows, want) <= 1e-4


def test_vanilla_cache_grows_with_the_stream(tiny_model):
    """The comparison point: a plain cache holds every token."""
    path, _ = tiny_model("f32-gqa2")
    llm = open_exact(path, "vanilla", n_ctx=256, n_batch=16)
    llm.logits(random_tokens(200))
    assert llm.cache_info()["cells_used"] == 200
