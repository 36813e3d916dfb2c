"""Gemma 3 270M (the offline packages of `pip install 'lminf_gguf[gemma]'`; skipped without them) end to end: a real
iSWA model (15 local layers with a 512-token window, 3 global ones, 32K trained context) through LM-Infinite.
Each check is a few seconds on two cores: the window is kept at the local layers' 512."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import rel_err

import lminf_gguf
from lminf_gguf.models import PACKAGED_MODELS, packaged_model_path

try:
    MODEL = packaged_model_path("gemma3-270m")
except FileNotFoundError:
    MODEL = None

pytestmark = pytest.mark.skipif(MODEL is None, reason="Gemma 3 270M not installed (pip install 'lminf_gguf[gemma]')")

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
        "considered the rightful property of some one or other of their daughters. ")


@pytest.fixture(scope="module")
def model():
    with lminf_gguf.Model(MODEL) as m:
        yield m


def test_packaged_name_resolves_to_the_assembled_file():
    assert "gemma3-270m" in PACKAGED_MODELS and MODEL.endswith(".gguf")
    assert lminf_gguf.models.resolve_model("gemma3-270m") == MODEL


def test_lminf_equals_vanilla_while_the_window_covers_the_text(model):
    """Below L, LM-Infinite attends to everything vanilla does: the same logits up to the f16 cache."""
    with lminf_gguf.LMInfinite(model, n_local=512, n_batch=128, n_threads=2) as lminf, \
            lminf_gguf.LMInfinite(model, mode="vanilla", n_ctx=512, n_batch=128, n_threads=2) as vanilla:
        tokens = lminf.tokenize(TEXT * 3)[:400]
        assert rel_err(lminf.logits(tokens), vanilla.logits(tokens)) < 2e-3
        info = lminf.cache_info()
        assert info["cells_swa"] > 0 and info["cells_used"] <= info["cells_bound"]


def test_a_stream_past_the_window_stays_bounded_and_sane(model):
    # ~1,100 tokens: twice the window; rebased at 700 (the default would wait until G + 2L + n_batch = 1,156)
    with lminf_gguf.LMInfinite(model, n_global=4, n_local=512, n_batch=128, n_threads=2, rebase_at=700) as llm:
        nll = np.asarray(llm.nll(TEXT * 12))
        info = llm.cache_info()
        assert np.isfinite(nll).all() and info["rebases"] > 0
        assert info["cells_used"] <= info["cells_bound"]
        # a repeated paragraph is predictable once seen: the later copies have a low loss
        assert nll[-200:].mean() < 1.0 < nll[:60].mean()


def test_generation_and_chat_with_its_template(model):
    with lminf_gguf.LMInfinite(model, n_local=512, n_batch=64, n_threads=2) as llm:
        text = llm.generate("The capital of France is", max_tokens=8, temperature=0)
        assert text.strip()
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
        prompt = llm.render_chat(messages)
        # this file carries no chat template: Gemma's own turns, not ChatML (no system role: it opens the user turn)
        assert llm.chat_format.source == "gemma-fallback"
        # (BOS is a token, added when the prompt is tokenised, not text in it)
        assert prompt == "<start_of_turn>user\nBe brief.\n\nSay hello.<end_of_turn>\n<start_of_turn>model\n"
        out = llm.create_chat_completion(messages, max_tokens=8, temperature=0)
        reply = out["choices"][0]["message"]["content"]
        assert reply.strip() and "<end_of_turn>" not in reply and "<start_of_turn>" not in reply
