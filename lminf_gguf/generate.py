"""Sampling and the generation loop: evaluate a prompt, then sample token by token, with stop strings held back
until they can be told apart from ordinary text. LMInfinite.generate and the OpenAI-shaped calls run on it."""

from __future__ import annotations

import codecs
import ctypes
import time
from typing import Iterator, Optional

import numpy as np

from . import inputs
from ._lib import llama_cpp, llama_raw
from .errors import InvalidInputError
from .grammar import check_gbnf
from .options import MODES, Sampling


def check_sampling(llm, sampling: dict) -> dict:
    """Sampling.checked's settings (as keywords) checked against this session: logit_bias ids in the vocabulary,
    a grammar that llama.cpp parses (tried once here, before any prompt is evaluated)."""
    for tok in (sampling.get("logit_bias") or {}):
        if not 0 <= tok < llm.n_vocab:
            raise InvalidInputError(f"logit_bias: token id {tok} outside the vocabulary [0, {llm.n_vocab})")
    if sampling.get("grammar") is not None:
        llama_raw.llama_sampler_free(_grammar_sampler(llm, sampling["grammar"]))
    return sampling


def _grammar_sampler(llm, grammar):
    """llama.cpp's grammar sampler; InvalidInputError when it cannot parse the grammar (it returns NULL, which
    llama-cpp-python's add_grammar hands on to the chain: a segfault)."""
    text, root = getattr(grammar, "_grammar", None), getattr(grammar, "_root", None)
    if not isinstance(text, str) or not isinstance(root, str):
        raise InvalidInputError("grammar must be a llama-cpp-python LlamaGrammar")
    # every grammar passes here before llama.cpp's recursive parser sees it, whatever built it (grammar.py)
    check_gbnf(text, "grammar")
    check_gbnf(root, "grammar root")
    text, root = text.encode("utf-8", "surrogatepass"), root.encode("utf-8", "surrogatepass")
    sampler = llama_raw.llama_sampler_init_grammar(llm.model.llama.vocab, text, root)
    if not sampler:
        raise InvalidInputError("the grammar does not parse (llama.cpp's grammar parser refused it)")
    return sampler


def make_sampler(llm, **settings):
    """llama.cpp's sampler chain for these settings (options.Sampling's keywords, checked already; greedy when
    temperature <= 0): logit bias, penalties of the last 64 tokens, a grammar (llama-cpp-python's LlamaGrammar),
    then the samplers in llama.cpp's default order (top-k, typical, top-p, min-p, temperature)."""
    s = Sampling(**settings)
    temperature, logit_bias, grammar = s.temperature, s.logit_bias, s.grammar
    repeat_penalty, frequency_penalty, presence_penalty = s.repeat_penalty, s.frequency_penalty, s.presence_penalty
    sampler = llama_cpp._internals.LlamaSampler()
    if logit_bias:
        sampler.add_logit_bias(llm.n_vocab, logit_bias)
    if repeat_penalty != 1.0 or frequency_penalty or presence_penalty:
        sampler.add_penalties(llm.n_vocab, 64, repeat_penalty, frequency_penalty, presence_penalty)
    if grammar is not None:
        llama_raw.llama_sampler_chain_add(sampler.sampler, _grammar_sampler(llm, grammar))
    if temperature <= 0:
        sampler.add_greedy()
        return sampler
    sampler.add_top_k(s.top_k)
    if s.typical_p < 1.0:
        sampler.add_typical(s.typical_p, 1)
    sampler.add_top_p(s.top_p, 1)
    sampler.add_min_p(s.min_p, 1)
    sampler.add_temp(temperature)
    sampler.add_dist(s.seed if s.seed is not None else llama_raw.LLAMA_DEFAULT_SEED)
    return sampler


def ban_eog(llm, sampling: dict) -> dict:
    """sampling with every end-of-generation token of the vocabulary banned (logit bias -inf): llama-server's
    ignore_eos. The reply then runs to max_tokens (or a stop string)."""
    eog = llm.__dict__.get("eog_tokens")
    if eog is None:  # once per session: a walk over the vocabulary
        vocab = llm.model.llama.vocab
        eog = llm.__dict__["eog_tokens"] = [t for t in range(llm.n_vocab) if llama_raw.llama_vocab_is_eog(vocab, t)]
    return dict(sampling, logit_bias={**(sampling.get("logit_bias") or {}), **{t: -np.inf for t in eog}})


def tally(llm, **counts) -> None:
    """Add to the session's running totals (llm.totals: prompt_tokens, prompt_seconds, predicted_tokens,
    predicted_seconds, decodes), which a server reads before and after a request for its metrics and timings."""
    totals = llm.__dict__.setdefault("totals", dict.fromkeys(TOTALS, 0))
    for k, v in counts.items():
        totals[k] += v


TOTALS = ("prompt_tokens", "prompt_seconds", "predicted_tokens", "predicted_seconds", "decodes")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of logits along the last axis (float32; the model's distribution, before sampling)."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def token_record(llm, tok: int, lp: Optional[np.ndarray], top: int, offset: int = 0) -> dict:
    """One token for logprobs: id, bytes, its log-probability under lp (None: none, e.g. a prompt's first
    token) and the `top` most likely alternatives as (id, log-probability, bytes), most likely first."""
    rec = {"id": tok, "bytes": inputs.piece(llm, tok), "offset": offset, "logprob": None, "top": []}
    if lp is not None:
        rec["logprob"] = float(lp[tok])
        if top > 0:
            best = np.argpartition(-lp, top - 1)[:top] if top < lp.shape[0] else np.arange(lp.shape[0])
            best = best[np.argsort(-lp[best], kind="stable")]
            rec["top"] = [(int(i), float(lp[i]), inputs.piece(llm, int(i))) for i in best]
    return rec


def prompt_blocks(llm, n: int) -> list:
    """(start, end) of the llama_decode calls for n prompt tokens: n_batch at a time, and in lminf-topk mode the
    last llm.topk_tail tokens one at a time, since only the last row of each call picks middle tokens: each token of
    the question then picks its own (the others see only the window)."""
    head = n - min(n, llm.topk_tail)
    return [(a, min(a + llm.n_batch, head)) for a in range(0, head, llm.n_batch)] + [(a, a + 1) for a in range(head, n)]


class PromptProgress(dict):
    """A prompt-evaluation report, llama-server's prompt_progress ({"total", "cache", "processed", "time_ms"}):
    pieces() yields it among the text pieces when its progress callback returns one (the server's streamed chat
    with "return_progress": true); any other return value of the callback is ignored."""


def pieces(llm, tokens, fresh, max_tokens, *, stops, progress, text: Optional[bytes], info: dict,
           logprobs: Optional[int] = None, prompt_logprobs: bool = False, **sampling) -> Iterator[str]:
    """Evaluate the prompt tokens, then sample; yield text pieces. info gets finish_reason, prompt_tokens,
    completion_tokens. text: the bytes the prompt tokens stand for (chat prefix tracking), or None.
    progress(done, total) is called after each prompt batch; a PromptProgress it returns is yielded as it is.

    logprobs (k >= 0): info["tokens"] gets a token_record per sampled token (with "offset", the character offset
    of its text in the generated text) with the k most likely alternatives; prompt_logprobs: info["prompt"] gets
    one per prompt token (the prompt evaluated with all its logits)."""
    info.update(finish_reason="cancelled", prompt_tokens=len(tokens), completion_tokens=0)
    if logprobs is not None:
        info["tokens"] = []
    if fresh:
        llm.reset()
    seq = llm.seq
    prev_text, prev_tokens = seq.text, seq.tokens
    seq.forget_text()
    done = 0
    started = time.perf_counter()
    if prompt_logprobs:
        info["prompt"] = []
        prev = None if fresh else seq.last
    blocks = prompt_blocks(llm, len(tokens))
    for start, end in blocks:
        if seq.cancel.is_set():
            return
        block = tokens[start:end]
        out = seq.decode(block, all_logits=prompt_logprobs)
        if prompt_logprobs:  # row k - 1 predicts token k (one row at a time: [n_batch, n_vocab] twice is large)
            for k, tok in enumerate(block):
                row = out[k - 1] if k else prev
                info["prompt"].append(token_record(llm, tok, None if row is None else log_softmax(row),
                                                   logprobs or 0))
            prev = out[-1].copy()
        done = end
        if progress:
            report = progress(done, len(tokens))
            if isinstance(report, PromptProgress):  # the caller asked for it among the pieces (a streamed chat)
                yield report
    tally(llm, prompt_tokens=len(tokens), prompt_seconds=time.perf_counter() - started,
          decodes=len(blocks))
    started = time.perf_counter()
    if text is not None:
        seq.text = bytearray(text) if fresh else (prev_text + text if prev_text is not None else None)
        seq.tokens = list(tokens) if fresh else (prev_tokens + list(tokens) if prev_tokens is not None and
                                                 seq.text is not None else None)
        if seq.tokens is None:
            seq.text = None
    if seq.last is None:
        raise InvalidInputError("nothing to continue: empty prompt and empty sequence")
    if max_tokens is None or max_tokens <= 0:
        max_tokens = llm.n_local if MODES[llm.mode].bounded or MODES[llm.mode].shift else \
            seq.cache.n_ctx - seq.cache.pos
    sampler = make_sampler(llm, **sampling)
    cand = llama_cpp._internals.LlamaTokenDataArray(n_vocab=llm.n_vocab)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    vocab = llm.model.llama.vocab
    generated = ""   # text sampled so far
    emitted = 0      # characters of it already yielded
    hold = max((len(s) for s in stops), default=0)
    decoded = 0      # sampled tokens evaluated (llama_decode calls)
    try:
        for _ in range(max_tokens):
            if seq.cancel.is_set():
                info["finish_reason"] = "cancelled"
                break
            if logprobs is not None:
                lp = log_softmax(seq.last)
            cand.copy_logits(seq.last)
            llama_raw.llama_sampler_apply(sampler.sampler, ctypes.byref(cand.candidates))
            selected = cand.candidates.selected
            tok = int(cand.candidates_data.id[selected])
            if cand.candidates_data.logit[selected] == -np.inf:
                # every token is ruled out (a grammar that asks for text no token spells, or one complete while
                # logit_bias bans the end of turn): llama.cpp's grammar would throw on accepting any of them, and
                # a C++ exception there ends the process
                if not info["completion_tokens"]:
                    raise InvalidInputError("the grammar allows no token of this model's vocabulary here (it asks "
                                            "for text that no token spells)")
                info["finish_reason"] = "stop"
                break
            if llama_raw.llama_vocab_is_eog(vocab, tok):
                info["finish_reason"] = "stop"
                break
            llama_raw.llama_sampler_accept(sampler.sampler, tok)
            info["completion_tokens"] += 1
            if logprobs is not None:
                info["tokens"].append(token_record(llm, tok, lp, logprobs, offset=len(generated)))
            piece = inputs.piece(llm, tok)
            generated += decoder.decode(piece)
            if stops:
                hits = [i for i in (generated.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0]
                if hits:
                    cut = min(hits)
                    info["stop_word"] = next(s for s in stops if generated.find(s, max(0, emitted - len(s))) == cut)
                    if cut > emitted:
                        yield generated[emitted:cut]
                    info["finish_reason"] = "stop"
                    return
                # hold back a tail that may be the start of a stop string
                safe = len(generated)
                for k in range(1, min(hold, len(generated)) + 1):
                    if any(s.startswith(generated[-k:]) for s in stops):
                        safe = len(generated) - k
            else:
                safe = len(generated)
            if safe > emitted:
                yield generated[emitted:safe]
                emitted = safe
            seq.decode([tok], all_logits=False)
            decoded += 1
            if seq.text is not None:
                seq.text += piece
                seq.tokens.append(tok)
        else:
            info["finish_reason"] = "length"
        # the bytes of a character the last token left incomplete (a reply cut by max_tokens inside a multi-byte
        # character) are dropped, not shown as U+FFFD; held-back text comes out
        if len(generated) > emitted:
            yield generated[emitted:]
    finally:
        sampler.close()
        tally(llm, predicted_tokens=info["completion_tokens"], predicted_seconds=time.perf_counter() - started,
              decodes=decoded)


def stop_list(stop) -> list:
    return [s for s in ([stop] if isinstance(stop, str) else list(stop or [])) if s]
