"""OpenAI fields of the Python API on the default model (issue 15): logprobs checked against the logits of a fresh
evaluation, n choices, echo, several prompts and token-id prompts, stream_options.include_usage."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_default_model

import lminf_gguf
from lminf_gguf.errors import InvalidInputError
from lminf_gguf.generate import log_softmax

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm():
    with lminf_gguf.LMInfinite(n_local=256, n_threads=2) as session:
        yield session


def _reference_logprobs(llm, tokens):
    """log-softmax of every position of a fresh evaluation: row i predicts token i + 1."""
    return log_softmax(llm.logits(tokens))


@needs_default_model
def test_completion_logprobs_and_echo_match_a_fresh_evaluation(llm):
    out = llm.create_completion(PROMPT, max_tokens=6, temperature=0, logprobs=3, echo=True)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    prompt_tokens = llm.tokenize(PROMPT)
    n_prompt = len(prompt_tokens)
    assert choice["text"].startswith(PROMPT)
    assert len(lp["tokens"]) == n_prompt + out["usage"]["completion_tokens"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    # every token's log-probability under the model, from an independent evaluation of the whole text
    all_tokens = prompt_tokens + [llm.tokenize(t, add_bos=False)[0] for t in lp["tokens"][n_prompt:]]
    ref = _reference_logprobs(llm, all_tokens)
    got = np.array(lp["token_logprobs"][1:], dtype=np.float64)
    want = np.array([ref[i - 1, all_tokens[i]] for i in range(1, len(all_tokens))], dtype=np.float64)
    assert np.abs(got - want).max() < 2e-3, (got, want)
    # greedy: each generated token is the most likely one, listed first among its 3 alternatives
    for i in range(n_prompt, len(lp["tokens"])):
        top = lp["top_logprobs"][i]
        assert len(top) <= 3 and max(top.values()) == pytest.approx(lp["token_logprobs"][i], abs=1e-6)
        assert next(iter(top)) == lp["tokens"][i]


@needs_default_model
def test_chat_logprobs_shape_and_greedy_choice(llm):
    out = llm.create_chat_completion([{"role": "user", "content": "Say hello."}], max_tokens=5, temperature=0,
                                     logprobs=True, top_logprobs=2)
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"]
    assert "".join(c["token"] for c in content) == out["choices"][0]["message"]["content"]
    for c in content:
        assert bytes(c["bytes"]).decode("utf-8", "replace") == c["token"] and c["logprob"] <= 0
        assert len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["token"] == c["token"]
        assert c["top_logprobs"][0]["logprob"] >= c["top_logprobs"][1]["logprob"]
    # without logprobs: None, as before
    assert llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=2)["choices"][0][
        "logprobs"] is None


@needs_default_model
def test_n_choices_seeds_and_several_prompts(llm):
    kw = dict(max_tokens=6, temperature=1.0, seed=5)
    out = llm.create_completion(PROMPT, n=3, **kw)
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    # choice i is the single completion with seed + i
    assert texts == [llm.create_completion(PROMPT, seed=5 + i, max_tokens=6, temperature=1.0)["choices"][0]["text"]
                     for i in range(3)]
    assert len(set(texts)) > 1
    # a list of prompts (strings or token ids): prompt p's choice j has index p * n + j
    ids = llm.tokenize("One, two,")
    out = llm.create_completion([PROMPT, ids], n=2, max_tokens=4, temperature=0)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["choices"][0]["text"] == out["choices"][1]["text"] == \
        llm.create_completion(PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]
    assert out["choices"][2]["text"] == llm.create_completion(ids, max_tokens=4, temperature=0)["choices"][0]["text"]
    assert out["usage"]["completion_tokens"] == 16  # 4 choices of 4 tokens (no end of generation this soon)
    chat = llm.create_chat_completion([{"role": "user", "content": "Pick a colour."}], n=2, **kw)
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    with pytest.raises(InvalidInputError):
        llm.create_completion(PROMPT, n=0)
    with pytest.raises(InvalidInputError):
        llm.create_completion(PROMPT, n=2, fresh=False)


@needs_default_model
def test_stream_include_usage_and_indices(llm):
    chunks = list(llm.create_completion(PROMPT, max_tokens=4, temperature=0, n=2, stream=True,
                                        stream_options={"include_usage": True}))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks[:-1])
    text = {i: "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"][0]["index"] == i)
            for i in (0, 1)}
    whole = llm.create_completion(PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]
    assert text == {0: whole, 1: whole}
    chat = list(llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=3, stream=True,
                                           stream_options={"include_usage": True}))
    assert chat[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chat[-1]["choices"] == [] and chat[-1]["usage"]["total_tokens"] > 0
    # without stream_options: no usage key, as before
    assert "usage" not in list(llm.create_completion(PROMPT, max_tokens=2, stream=True))[-1]
    with pytest.raises(InvalidInputError):
        llm.create_completion(PROMPT, stream_options={"include_usage": True})  # only with stream=True
    with pytest.raises(InvalidInputError):
        llm.create_completion(PROMPT, logprobs=21)
