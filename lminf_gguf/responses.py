"""The OpenAI-shaped API (the dict shapes of llama-cpp-python's Llama) and chat templates, over a session.
LMInfinite.create_completion / create_chat_completion / chat_formatter / render_chat call these."""

from __future__ import annotations

import codecs
import json
import time
import uuid
from dataclasses import dataclass
import os
from typing import Callable, List, Optional, Sequence, Union

from . import grammar, inputs, tools
from ._lib import llama_cpp, llama_raw
from .errors import InvalidInputError
from .context import in_use
from .generate import PromptProgress, ban_eog, stop_list
from .options import (CHAT_SAMPLING, SAMPLING, check_chat_logprobs, check_logprobs, check_n,
                      check_return_progress, include_usage, sampling_keywords)

# the fallback chat templates when the GGUF file has none, or one that cannot be rendered: the family's own turn
# format where the architecture says which (FALLBACK_TEMPLATES), else ChatML
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


# Gemma's turns (it has no system role: a system message opens the next user turn); "<end_of_turn>" ends a turn
GEMMA_TEMPLATE = ("{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
                  "{% set ns.sys = ns.sys + m['content'] + '\\n\\n' %}{% else %}{{ '<start_of_turn>' + ('model' if "
                  "m['role'] == 'assistant' else 'user') + '\\n' + (ns.sys if m['role'] != 'assistant' else '') + "
                  "m['content'] + '<end_of_turn>\\n' }}{% if m['role'] != 'assistant' %}{% set ns.sys = '' %}"
                  "{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}"
                  "{% endif %}")

# general.architecture prefix -> (name, template, the string that ends the model's turn)
FALLBACK_TEMPLATES = {"gemma": ("gemma", GEMMA_TEMPLATE, "<end_of_turn>")}
CHATML = ("chatml", CHATML_TEMPLATE, "<|im_end|>")


def fallback_template(llm) -> tuple:
    """(name, Jinja2 template, end-of-turn string) used when the GGUF file's own template is missing or fails."""
    arch = str(llm.metadata.get("general.architecture", ""))
    return next((v for k, v in FALLBACK_TEMPLATES.items() if arch.startswith(k)), CHATML)


@dataclass
class _Run:
    """One choice to generate: prompt tokens, whether they start a fresh sequence, the bytes they stand for (chat
    prefix tracking), the echoed prompt text (completions with echo) and the sampling settings."""
    tokens: list
    fresh: bool
    text: Optional[bytes]
    echo: Optional[str]
    sampling: dict


def _seeded(sampling: dict, i: int) -> dict:
    """The sampling settings of choice i: a given seed advances by i, so that n choices differ and repeat."""
    if i == 0 or sampling.get("seed") is None:
        return sampling
    return dict(sampling, seed=(sampling["seed"] + i) % 2**32)


def _prompts(prompt) -> list:
    """A completion prompt as a list of prompts: a string or a list of token ids is one prompt; a list of strings
    or of token-id lists is several (one choice each, OpenAI's batch form)."""
    if isinstance(prompt, (str, bytes)):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (str, list, tuple)) for p in prompt):
        return list(prompt)
    return [prompt]


def _text_offsets(records, base: int = 0) -> None:
    """Character offsets of prompt token records (in place), as the prompt text decodes."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    at = base
    for rec in records:
        rec["offset"] = at
        at += len(decoder.decode(rec["bytes"]))


def _reporter(cached: int) -> Callable[[int, int], PromptProgress]:
    """A progress callback whose reports are llama-server's prompt_progress: total and processed count the
    cached tokens (the held conversation) too, time_ms since the prompt's evaluation began."""
    started = time.perf_counter()
    return lambda done, total: PromptProgress(total=cached + total, cache=cached, processed=cached + done,
                                              time_ms=int((time.perf_counter() - started) * 1000.0))


def _events(llm, runs: List[_Run], max_tokens, stops, progress, logprobs: Optional[int], usage: dict,
            prompt_tokens: Optional[int] = None):
    """Generate the runs one after another; yield (index, text, records, finish_reason): text pieces with the
    token records whose text starts in them, then (index, "", [...], finish_reason) once per choice. usage gets
    the prompt tokens evaluated and the tokens generated, all choices together. prompt_tokens (the whole
    prompt's token count): report the prompt's evaluation, (index, PromptProgress, [], None) after each batch,
    before the choice's text."""
    for index, run in enumerate(runs):
        info: dict = {}
        echo_logprobs = run.echo is not None and logprobs is not None
        if prompt_tokens is not None:
            progress = _reporter(prompt_tokens - len(run.tokens))
        gen = llm.generate_pieces(run.tokens, run.fresh, max_tokens, run.sampling, stops, progress, run.text, info,
                                  logprobs=logprobs, prompt_logprobs=echo_logprobs)
        records: list = []
        taken = done = 0
        try:
            first = next(gen, None)  # evaluates the prompt (reporting its progress first, when asked to)
            while isinstance(first, PromptProgress):
                yield index, first, [], None
                first = next(gen, None)
            if run.echo is not None:
                prompt_records = info.get("prompt", [])
                _text_offsets(prompt_records)
                yield index, run.echo, prompt_records, None
                done = len(run.echo)
            stream = gen if first is None else _chain(first, gen)
            for piece in stream:
                records = info.get("tokens", [])
                new = []
                base = done - (len(run.echo) if run.echo is not None else 0)
                while taken < len(records) and records[taken]["offset"] < base + len(piece):
                    new.append(records[taken])
                    taken += 1
                done += len(piece)
                yield index, piece, _shifted(new, run.echo), None
        finally:
            gen.close()
            usage["prompt_tokens"] += info.get("prompt_tokens", 0)
            usage["completion_tokens"] += info.get("completion_tokens", 0)
        if info.get("stop_word") is not None:  # the stop string that ended this choice (completions' stop_reason)
            usage.setdefault("stop_words", {})[index] = info["stop_word"]
        yield index, "", [], info.get("finish_reason", "cancelled")


def _chain(first, rest):
    yield first
    yield from rest


def _shifted(records, echo: Optional[str]) -> list:
    if not echo:
        return records
    return [dict(r, offset=r["offset"] + len(echo)) for r in records]


def _text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def completion_logprobs(records) -> Optional[dict]:
    """Token records in the logprobs shape of OpenAI's completions (and llama-cpp-python's)."""
    return {"tokens": [_text(r["bytes"]) for r in records],
            "text_offset": [r["offset"] for r in records],
            "token_logprobs": [r["logprob"] for r in records],
            "top_logprobs": [None if r["logprob"] is None else {_text(b): lp for _, lp, b in r["top"]}
                             for r in records]}


def chat_logprobs(records) -> dict:
    """Token records in the logprobs shape of OpenAI's chat completions."""
    return {"content": [{"token": _text(r["bytes"]), "logprob": r["logprob"], "bytes": list(r["bytes"]),
                         "top_logprobs": [{"token": _text(b), "logprob": lp, "bytes": list(b)}
                                          for _, lp, b in r["top"]]} for r in records],
            "refusal": None}


def _collect(events, choices: list, text_key: str, shape_logprobs) -> None:
    """A whole (non-streamed) response from _events: each choice's text (choices[i]["text"], or its message's
    content for text_key "message"), its token records (when logprobs were asked for: a list, not None) in the
    endpoint's shape, and its finish_reason."""
    for index, text, records, finish in events:
        c = choices[index]
        if text_key == "message":
            c["message"]["content"] += text
        else:
            c[text_key] += text
        if c["logprobs"] is not None:
            c["logprobs"] += records
        if finish is not None:
            c["finish_reason"] = finish
    for c in choices:
        if c["logprobs"] is not None:
            c["logprobs"] = shape_logprobs(c["logprobs"])


def _usage(usage: dict) -> dict:
    return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


def create_completion(llm, prompt, max_tokens: Optional[int], sampling: dict, stop: Union[str, List[str], None],
                      stream: bool, fresh: bool, progress: Optional[Callable[[int, int], None]], n: int = 1,
                      logprobs: Optional[int] = None, echo: bool = False, stream_options: Optional[dict] = None):
    """Text completion with the dict shape of llama_cpp.Llama.create_completion ("text_completion"; with
    stream=True an iterator of chunks, each choice ending with a chunk of text "" and its finish_reason).

    The prompt is evaluated in a fresh sequence unless fresh=False (then it is appended to the current
    one; an empty prompt continues it). A list of strings (or of token-id lists) is several prompts, each with
    its n choices (index = prompt * n + choice). max_tokens None or <= 0: up to n_local tokens. finish_reason is
    "stop" (end of generation token or stop string), "length", or "cancelled" (see cancel()). logprobs=k gives
    each token's log-probability and its k most likely alternatives; echo=True puts the prompt in front of the
    text (with logprobs, its tokens' too, the first one None). n choices are generated one after another (a
    given seed advances by one per choice). stream_options={"include_usage": True} ends a stream with a chunk
    of usage and no choices. A choice that a stop string ended has "stop_reason": that string (vLLM's field).
    typical_p: locally typical sampling (1 = off); ignore_eos=True bans the end-of-generation tokens (the reply runs
    to max_tokens or a stop string), as llama-server's fields.
    """
    llm.seq.cancel.clear()
    n = check_n(n)
    logprobs = check_logprobs(logprobs)
    with_usage = include_usage(stream, stream_options)
    prompts = _prompts(prompt)
    if (len(prompts) > 1 or n > 1) and not fresh:
        raise InvalidInputError("several prompts or n > 1 need fresh=True")
    runs = []
    for p in prompts:
        tokens = llm.prompt_tokens(p, fresh)
        if not tokens and fresh:
            raise InvalidInputError("empty prompt")
        shown = (p if isinstance(p, str) else llm.detokenize(tokens)) if echo else None
        runs += [_Run(tokens, fresh, None, shown, _seeded(sampling, i)) for i in range(n)]
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    events = _events(llm, runs, max_tokens, stop_list(stop), progress, logprobs, usage)
    cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": llm.model_name}
    if stream:
        return _completion_chunks(head, events, logprobs is not None, usage if with_usage else None, usage)
    choices = [{"text": "", "index": i, "logprobs": [] if logprobs is not None else None, "finish_reason": None}
               for i in range(len(runs))]
    _collect(events, choices, "text", completion_logprobs)
    for i, word in usage.get("stop_words", {}).items():
        choices[i]["stop_reason"] = word
    return dict(head, choices=choices, usage=_usage(usage))


def _completion_chunks(head: dict, events, with_logprobs: bool, usage: Optional[dict], counts: dict):
    for index, text, records, finish in events:
        if text or finish is not None:
            choice = {"text": text, "index": index,
                      "logprobs": completion_logprobs(records) if with_logprobs else None, "finish_reason": finish}
            if finish is not None and index in counts.get("stop_words", {}):
                choice["stop_reason"] = counts["stop_words"][index]
            yield dict(head, choices=[choice], **({"usage": None} if usage is not None else {}))
    if usage is not None:
        yield dict(head, choices=[], usage=_usage(usage))


@dataclass
class ChatFormat:
    """The chat template of a session (LMInfinite.chat_format, made by chat_format on first use): its Jinja2
    formatter, where it comes from (source: "gguf", the file's tokenizer.chat_template, else "NAME-fallback", e.g.
    "chatml-fallback") and the text of the BOS token (a prompt rendered with it needs no BOS token added)."""
    formatter: object
    source: str
    bos_text: str

    @property
    def from_gguf(self) -> bool:
        """The GGUF file's own template (whose end of turn is an end-of-generation token, not a stop string)."""
        return self.source == "gguf"


def chat_format(llm) -> ChatFormat:
    """The session's ChatFormat: the GGUF tokenizer.chat_template, or fallback_template's (read once)."""
    if llm.chat_format is None:
        Jinja2ChatFormatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter

        vocab = llm.model.llama.vocab

        def tok_text(tok):
            return inputs.piece(llm, tok).decode("utf-8", errors="replace") if tok >= 0 else ""

        bos, eos = tok_text(llama_raw.llama_vocab_bos(vocab)), tok_text(llama_raw.llama_vocab_eos(vocab))
        template = llm.metadata.get("tokenizer.chat_template")
        formatter = None
        if template:
            try:
                formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
                formatter(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
            except Exception:  # a template jinja2 cannot compile or render: use the fallback
                formatter = None
        name, fallback, _ = fallback_template(llm)
        llm.chat_format = ChatFormat(formatter or Jinja2ChatFormatter(fallback, eos_token=eos, bos_token=bos),
                                     "gguf" if formatter is not None else f"{name}-fallback", bos)
    return llm.chat_format


def chat_formatter(llm):
    """The Jinja2 chat formatter of this model: the GGUF tokenizer.chat_template, or fallback_template's."""
    return chat_format(llm).formatter


def chat_template(llm) -> tuple:
    """(label, Jinja2 source) of the chat template in use: the GGUF file's, or the fallback's."""
    if chat_format(llm).from_gguf:
        return f"the chat template of {llm.model_name}", llm.metadata["tokenizer.chat_template"]
    name, source, _ = fallback_template(llm)
    return f"the {name} fallback template ({llm.model_name} has no usable one)", source


def tool_plan(llm, tool_list, tool_choice, parallel_tool_calls) -> tools.ToolPlan:
    """The request's tool fields checked and bound to this model's chat template (tools.check_tools, tools.bind)."""
    plan = tools.check_tools(tool_list, tool_choice, parallel_tool_calls)
    return tools.bind(plan, *chat_template(llm)) if plan.active else plan


def _offered(tool_list, tool_choice) -> Optional[list]:
    """The tools a request shows the template (checked; no grammar built: a slot's score needs only the prompt)."""
    return tools.check_tools(tool_list, tool_choice).tools


def render_chat(llm, messages: List[dict], tool_list: Optional[list] = None) -> str:
    """The prompt for messages (and the tools offered, as tool_plan's ToolPlan.tools): the model's chat template
    (falling back to ChatML when it fails, unless tools or tool calls are involved: the fallback would drop them)."""
    formatter = chat_formatter(llm)
    messages = tools.template_messages(messages)
    calls = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("tool_calls")]
    if calls:
        label, source = chat_template(llm)
        if not tools.reads_tool_calls(source):
            raise InvalidInputError(f"messages[{calls[0]}].tool_calls: {label} never shows an assistant's tool "
                                    "calls, so this history cannot be given to the model")
    try:
        return formatter(messages=messages, tools=tool_list).prompt
    except Exception as e:
        if not chat_format(llm).from_gguf:
            raise
        if tool_list or calls:
            raise InvalidInputError(f"{chat_template(llm)[0]} cannot render this conversation with its tools "
                                    f"({type(e).__name__}: {str(e)[:200]})") from None
        Jinja2ChatFormatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter
        return Jinja2ChatFormatter(fallback_template(llm)[1], eos_token="", bos_token="")(messages=messages).prompt


def held_prefix(llm, messages: List[dict], rendered: Optional[dict] = None, tool_list: Optional[list] = None) -> int:
    """Bytes of the rendered conversation that the sequence already holds (0: a chat would start afresh); reads
    only, so that a server can pick the slot that holds a conversation before taking it. rendered: a dict shared by
    the sessions of one model, so that the conversation is rendered once however many sessions are asked;
    tool_list: the tools offered (as render_chat)."""
    held = llm.seq.text
    if held is None or not messages:
        return 0
    rendered = {} if rendered is None else rendered
    if "data" not in rendered:
        try:
            rendered["data"] = render_chat(llm, list(messages), tool_list).encode("utf-8", errors="replace")
        except Exception:  # noqa: BLE001 (the request itself will report a template that fails)
            rendered["data"] = b""
    data = rendered["data"]
    return len(held) if len(data) > len(held) and data.startswith(bytes(held)) else 0


def create_chat_completion(llm, messages: List[dict], max_tokens: Optional[int], sampling: dict,
                           stop: Union[str, List[str], None], stream: bool, n: int = 1,
                           logprobs: Optional[bool] = None, top_logprobs: Optional[int] = None,
                           stream_options: Optional[dict] = None, plan: Optional[tools.ToolPlan] = None,
                           return_progress: bool = False):
    """Chat completion with the dict shape of llama_cpp.Llama.create_chat_completion ("chat.completion";
    with stream=True "chat.completion.chunk" dicts: per choice a first delta {"role": "assistant"}, then
    {"content"}, then {} with the finish_reason).

    Tools (plan, from tool_plan): the template shows them; the reply is split into content and
    message.tool_calls ([{"id": "call_...", "type": "function", "function": {"name", "arguments": JSON text}}],
    content None when the reply is calls only), with finish_reason "tool_calls" when the model called tools and
    stopped by itself. Streamed, each call comes as it completes, as two tool_calls deltas: {"index", "id",
    "type", "function": {"name", "arguments": ""}}, then {"index", "function": {"arguments"}}.

    The conversation stays in the sequence: when the newly rendered prompt extends the text the sequence
    already holds (the previous prompt plus the reply as generated), only the new part is evaluated;
    otherwise the prompt is evaluated from scratch. The KV cache stays bounded however long the history.
    usage.prompt_tokens counts the tokens evaluated by this call (the new part only, when reused). The
    template is the GGUF tokenizer.chat_template, or the family's own (Gemma) or ChatML when there is none or it
    fails.
    n choices are generated one after another (the first may reuse the held prefix, the others evaluate the
    prompt again; the sequence then holds the last one). logprobs=True gives each content token's
    log-probability, top_logprobs (0..20) its most likely alternatives; stream_options as in create_completion.
    return_progress (stream only; llama-server's field): before a choice's first delta, a chunk after each prompt
    batch, {"choices": [], "prompt_progress": {"total", "cache", "processed", "time_ms"}}: total is the
    conversation's tokens, cache those the sequence held already, processed those evaluated so far (cache
    included: processed == total when the prompt is read), time_ms since its evaluation began.
    """
    if not messages:
        raise InvalidInputError("messages must not be empty")
    check_return_progress(return_progress, stream)
    llm.seq.cancel.clear()
    n = check_n(n)
    k = check_chat_logprobs(logprobs, top_logprobs)
    with_usage = include_usage(stream, stream_options)
    plan = plan or tools.ToolPlan()
    prompt = render_chat(llm, list(messages), plan.tools)
    data = prompt.encode("utf-8", errors="replace")
    spans = content_spans(data, messages, plan.tools)
    fmt = chat_format(llm)
    add_bos = not (fmt.bos_text and prompt.startswith(fmt.bos_text))
    tokens = tokenize_chat(llm, data, 0, spans, add_bos)
    held, held_tokens = llm.seq.text, llm.seq.tokens
    runs = []
    # the sequence is reused only when the tokens it holds are a prefix of a fresh tokenisation of the new prompt:
    # a reply that the client extends inside a token ("How" -> "However") or that the model spelt in other tokens
    # than the tokeniser would is evaluated afresh, so that every slot (and a fresh session) sees the same tokens
    if (held is not None and held_tokens is not None and len(data) > len(held) and data.startswith(bytes(held))
            and len(tokens) > len(held_tokens) and tokens[:len(held_tokens)] == held_tokens):
        runs.append(_Run(tokens[len(held_tokens):], False, data[len(held):], None, sampling))
    runs += [_Run(tokens, True, data, None, _seeded(sampling, i)) for i in range(len(runs), n)]
    stops = stop_list(stop) + [fallback_template(llm)[2]] * (not fmt.from_gguf)
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    events = _events(llm, runs, max_tokens, stops, None, k, usage, len(tokens) if return_progress else None)
    head = {"id": f"chatcmpl-{uuid.uuid4()}", "created": int(time.time()), "model": llm.model_name}
    if stream:
        return _chat_chunks(head, events, k is not None, usage if with_usage else None, plan)
    choices = [{"index": i, "message": {"role": "assistant", "content": ""},
                "logprobs": [] if k is not None else None, "finish_reason": None} for i in range(n)]
    _collect(events, choices, "message", chat_logprobs)
    if plan.active:
        for c in choices:
            content, calls = tools.split_reply(c["message"]["content"], plan.fmt, plan.names, plan.parallel)
            if calls:
                c["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
                c["finish_reason"] = _tool_finish(c["finish_reason"])
    return dict(head, object="chat.completion", choices=choices, usage=_usage(usage))


def _tool_finish(finish: str) -> str:
    # "tool_calls" only when the model ended its turn itself: a reply cut by max_tokens stays "length"
    return "tool_calls" if finish == "stop" else finish


def _chat_chunks(head: dict, events, with_logprobs: bool, usage: Optional[dict], plan: tools.ToolPlan):
    head = dict(head, object="chat.completion.chunk")
    extra = {"usage": None} if usage is not None else {}
    started = set()
    filters: dict = {}
    for index, text, records, finish in events:
        if isinstance(text, PromptProgress):  # return_progress: llama-server's chunk shape
            yield dict(head, choices=[], prompt_progress=dict(text), **extra)
            continue
        if index not in started:
            started.add(index)
            yield dict(head, choices=[{"index": index, "delta": {"role": "assistant"}, "logprobs": None,
                                       "finish_reason": None}], **extra)
            if plan.active:
                filters[index] = _ToolChunks(tools.CallFilter(plan.fmt, plan.names, plan.parallel))
        if index in filters:
            for delta, recs, end in filters[index].step(text, records, finish):
                yield dict(head, choices=[{"index": index, "delta": delta,
                                           "logprobs": chat_logprobs(recs) if with_logprobs and recs else None,
                                           "finish_reason": end}], **extra)
        elif text or finish is not None:
            delta = {"content": text} if text else {}
            yield dict(head, choices=[{"index": index, "delta": delta,
                                       "logprobs": chat_logprobs(records) if with_logprobs and text else None,
                                       "finish_reason": finish}], **extra)
    if usage is not None:
        yield dict(head, choices=[], usage=_usage(usage))


class _ToolChunks:
    """One streamed choice through a tools.CallFilter: (delta, token records, finish_reason) per chunk to send;
    token records wait for the next chunk sent (a held-back piece has none of its own)."""

    def __init__(self, calls: tools.CallFilter):
        self.filter, self.records, self.n_calls = calls, [], 0

    def step(self, text: str, records: list, finish: Optional[str]):
        self.records += records
        events = self.filter.feed(text) if text else []
        if finish is not None:
            events += self.filter.close()
        for kind, value in events:
            if kind == "content":
                yield {"content": value}, self._take(), None
                continue
            k, self.n_calls = self.n_calls, self.n_calls + 1
            fn = value["function"]
            yield {"tool_calls": [{"index": k, "id": value["id"], "type": "function",
                                   "function": {"name": fn["name"], "arguments": ""}}]}, [], None
            yield {"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]}, self._take(), None
        if finish is not None:
            yield {}, self._take(), _tool_finish(finish) if self.n_calls else finish

    def _take(self) -> list:
        out, self.records = self.records, []
        return out


def content_spans(data: bytes, messages, tool_list: Optional[list] = None) -> list:
    """Byte spans of the rendered prompt that hold the messages' contents, found in order (a template that trims
    a content is matched on the trimmed text), and the tools' and tool calls' JSON where the template writes it
    as `| tojson` does. A content is the caller's text: special-token text in it must stay text, or a user could
    close the turn and speak for the assistant."""
    spans = _json_spans(data, messages, tool_list)
    cursor = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            continue
        for candidate in (content, content.strip()):
            needle = candidate.encode("utf-8", errors="replace")
            at = data.find(needle, cursor) if needle else -1
            if at >= 0:
                spans.append((at, at + len(needle)))
                cursor = at + len(needle)
                break
    return _disjoint(spans)


def _json_spans(data: bytes, messages, tool_list: Optional[list]) -> list:
    """Spans of the tools' JSON and the history's call arguments, each at its first place in data."""
    texts = [json.dumps(t, ensure_ascii=False) for t in tool_list or []]
    for m in tools.template_messages(list(messages)):
        for c in (m.get("tool_calls") or []) if isinstance(m, dict) else []:
            texts.append(json.dumps(c["function"]["arguments"], ensure_ascii=False))
    spans = []
    for text in texts:
        needle = text.encode("utf-8", errors="replace")
        at = data.find(needle)
        if at >= 0:
            spans.append((at, at + len(needle)))
    return spans


def _disjoint(spans: list) -> list:
    """Spans sorted, each overlapping an earlier kept one dropped (tokenize_chat takes them in order)."""
    out: list = []
    for a, b in sorted(spans):
        if not out or a >= out[-1][1]:
            out.append((a, b))
    return out


def tokenize_chat(llm, data: bytes, start: int, spans, add_bos: bool) -> list:
    """Tokens of data[start:]: special tokens parsed in the template's own text, never inside a content span."""
    tokenize = llm.model.llama.tokenize
    tokens: list = []
    pos = start
    for a, b in spans:
        if b <= start:
            continue
        a = max(a, start)
        if a > pos:
            tokens += tokenize(data[pos:a], add_bos and not tokens and pos == start, True)
        tokens += tokenize(data[a:b], add_bos and not tokens and a == start, False)
        pos = b
    if pos < len(data) or not tokens:
        tokens += tokenize(data[pos:], add_bos and not tokens, True)
    return tokens


def response_format_grammar(response_format: dict):
    """OpenAI's response_format as a grammar: "text" (none), "json_object" (any JSON object; a "schema" key
    narrows it) or "json_schema" ({"json_schema": {"schema": ...}}), bounded and built by grammar.py."""
    if not isinstance(response_format, dict):
        raise InvalidInputError("response_format must be an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return grammar.any_json() if schema is None else grammar.from_schema(schema, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidInputError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        return grammar.from_schema(schema, "response_format")
    raise InvalidInputError(f"response_format type must be text, json_object or json_schema, not {kind!r}")


# the module functions under other names: the mixin's methods of the same names shadow them in its class body
_completion, _chat_completion = create_completion, create_chat_completion


class OpenAIStyle:
    """LMInfinite's OpenAI-shaped methods (the dict shapes and keyword names of llama-cpp-python's Llama), over the
    functions above; a mixin of LMInfinite, which provides sampling_settings, use and the session (seq)."""

    @property
    def model_name(self) -> str:
        return os.path.basename(self.model_path)

    @sampling_keywords(SAMPLING)
    def create_completion(self, prompt: Union[str, Sequence[int]], max_tokens: Optional[int] = 16, *,
                          stop: Union[str, List[str], None] = None, stream: bool = False, fresh: bool = True,
                          progress: Optional[Callable[[int, int], None]] = None, n: int = 1,
                          logprobs: Optional[int] = None, echo: bool = False, stream_options: Optional[dict] = None,
                          ignore_eos: bool = False, **sampling):
        sampling = self.sampling_settings(sampling)
        sampling = ban_eog(self, sampling) if ignore_eos else sampling
        return _completion(self, prompt, max_tokens, sampling, stop, stream, fresh, progress, n=n,
                                           logprobs=logprobs, echo=echo, stream_options=stream_options)

    create_completion.__doc__ = _completion.__doc__

    @in_use
    def chat_formatter(self):
        """The Jinja2 chat formatter of this model: the GGUF tokenizer.chat_template, or a fallback (Gemma's turns
        for gemma models, else ChatML)."""
        return chat_formatter(self)

    def render_chat(self, messages: List[dict], tools: Optional[list] = None) -> str:
        """The prompt for messages and the tools offered (OpenAI's `tools`): the model's chat template (falling back
        to ChatML when it fails, unless tools or tool calls are involved)."""
        return render_chat(self, messages, tool_plan(self, tools, None, None).tools)

    def held_prefix(self, messages: List[dict], rendered: Optional[dict] = None, tools: Optional[list] = None,
                    tool_choice=None) -> int:
        """Bytes of the rendered conversation this session already holds (0: a chat would start afresh); rendered:
        see responses.held_prefix; tools, tool_choice: the request's (a request with tools renders differently)."""
        try:
            offered = _offered(tools, tool_choice)
        except InvalidInputError:  # the request itself will report them
            return 0
        return held_prefix(self, messages, rendered, offered)

    @sampling_keywords(CHAT_SAMPLING)
    def create_chat_completion(self, messages: List[dict], max_tokens: Optional[int] = None, *,
                               stop: Union[str, List[str], None] = None, stream: bool = False,
                               response_format: Optional[dict] = None, n: int = 1, logprobs: Optional[bool] = None,
                               top_logprobs: Optional[int] = None, stream_options: Optional[dict] = None,
                               tools: Optional[list] = None, tool_choice=None,
                               parallel_tool_calls: Optional[bool] = None, ignore_eos: bool = False,
                               return_progress: bool = False, **sampling):
        plan = tool_plan(self, tools, tool_choice, parallel_tool_calls)
        grammar = sampling.get("grammar")
        grammar = response_format_grammar(response_format) if response_format else grammar
        if plan.grammar is not None and grammar is not None:
            raise InvalidInputError("tool_choice \"required\" or a named function constrains the reply to tool "
                                    "calls: it cannot be combined with response_format or grammar")
        sampling = self.sampling_settings(dict(sampling, grammar=plan.grammar or grammar), CHAT_SAMPLING)
        sampling = ban_eog(self, sampling) if ignore_eos else sampling
        return _chat_completion(self, messages, max_tokens, sampling, stop, stream, n=n,
                                                logprobs=logprobs, top_logprobs=top_logprobs,
                                                stream_options=stream_options, plan=plan,
                                                return_progress=return_progress)

    create_chat_completion.__doc__ = _chat_completion.__doc__
