"""Chat prefix reuse is token-level: a session reuses its sequence only when the tokens it holds are a prefix of a
fresh tokenisation of the new prompt, so the same conversation gives the same greedy answer on the session that
holds it, on any other slot and on a fresh session (it used to compare text: a client that extends the held reply
inside a token made the holding slot evaluate "How" + "ever", tokens a fresh tokenisation never produces)."""

from __future__ import annotations

import pytest

from conftest import needs_default_model

import lminf_gguf

pytestmark = needs_default_model


@pytest.fixture(scope="module")
def sessions():
    model = lminf_gguf.Model()
    a = lminf_gguf.LMInfinite(model, n_local=256, n_threads=2)
    b = lminf_gguf.LMInfinite(model, n_local=256, n_threads=2)
    yield a, b
    a.close()
    b.close()
    model.close()


def greedy(llm, messages):
    out = llm.create_chat_completion(messages, max_tokens=24, temperature=0)
    return out["choices"][0]["message"]["content"], out["usage"]["prompt_tokens"]


def test_a_reply_extended_inside_a_token_gives_the_fresh_answer(sessions):
    holder, fresh = sessions
    first = [{"role": "user", "content": "Say hello."}]
    holder.reset()
    cut = holder.create_chat_completion(first, max_tokens=3, temperature=0)["choices"][0]["message"]["content"]
    # the client sends the reply back continued inside its last token ("Hello! I" -> "Hello! It is ...")
    tok = lambda text: holder.tokenize(text, add_bos=False)   # noqa: E731
    assert tok(cut + "t") != tok(cut) + tok("t"), f"{cut!r} + 't' does not merge: pick another continuation"
    messages = first + [{"role": "assistant", "content": cut + "t is nice to meet you."},
                        {"role": "user", "content": "Who are you?"}]
    got, n_holder = greedy(holder, messages)
    fresh.reset()
    want, n_fresh = greedy(fresh, messages)
    assert got == want
    # the text extends what the holder holds, its tokens do not: it read the conversation afresh
    assert n_holder == n_fresh


def test_a_reused_conversation_holds_the_tokens_a_fresh_session_reads(sessions):
    """Multi-turn: the session that holds the conversation evaluates only each new turn, and what it then holds is
    token for token what a fresh session reads. (Their greedy answers can still part at a near-tie: llama.cpp's
    kernels round a reply decoded one token at a time differently from the same tokens in one batch, up to 1.0 in
    the logits on this model; llama-server's cache_prompt has the same property. Equal tokens are what reuse can
    promise; the test above shows equal answers where the holder reads afresh.)"""
    holder, fresh = sessions
    holder.reset()
    messages = [{"role": "user", "content": "Name three fruits."}]
    for turn in range(3):
        out = holder.create_chat_completion(messages, max_tokens=24, temperature=0)
        got, n_holder = out["choices"][0]["message"]["content"], out["usage"]["prompt_tokens"]
        fresh.reset()
        n_fresh = fresh.create_chat_completion(messages, max_tokens=1, temperature=0)["usage"]["prompt_tokens"]
        prompt = fresh.tokenize(fresh.render_chat(messages), add_bos=False, special=True)
        assert holder.seq.tokens[:len(prompt)] == prompt, turn
        if turn:
            assert n_holder < n_fresh, "the holding session re-read the conversation instead of reusing it"
        messages = messages + [{"role": "assistant", "content": got},
                               {"role": "user", "content": f"And {turn + 2} more?"}]
