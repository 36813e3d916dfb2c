"""The OpenAI-shaped API (the dict shapes of llama-cpp-python's Llama) and chat templates, over a session.
LMInfinite.create_completion / create_chat_completion / chat_formatter / render_chat call these."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Callable, List, Optional, Sequence, Union

from . import inputs
from ._lib import llama_cpp, llama_raw
from .errors import InvalidInputError
from .generate import stop_list

# the fallback chat template when the GGUF file has none, or one that cannot be rendered
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def create_completion(llm, prompt: Union[str, Sequence[int]], max_tokens: Optional[int], sampling: dict,
                      stop: Union[str, List[str], None], stream: bool, fresh: bool,
                      progress: Optional[Callable[[int, int], None]]):
    """Text completion with the dict shape of llama_cpp.Llama.create_completion ("text_completion"; with
    stream=True an iterator of chunks, the last one with text "" and the finish_reason).

    The prompt is evaluated in a fresh sequence unless fresh=False (then it is appended to the current
    one; an empty prompt continues it). max_tokens None or <= 0: up to n_local tokens. finish_reason is
    "stop" (end of generation token or stop string), "length", or "cancelled" (see cancel()).
    """
    llm._cancel.clear()
    tokens = llm._prompt_tokens(prompt, fresh)
    if not tokens and fresh:
        raise InvalidInputError("empty prompt")
    info: dict = {}
    pieces = llm._generate(tokens, fresh, max_tokens, sampling, stop_list(stop), progress, None, info)
    cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
    if stream:
        return completion_chunks(llm, pieces, info, cid, created)
    text = "".join(pieces)
    return {
        "id": cid, "object": "text_completion", "created": created, "model": llm.model_name,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": info["finish_reason"]}],
        "usage": {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                  "total_tokens": info["prompt_tokens"] + info["completion_tokens"]},
    }


def completion_chunks(llm, pieces, info, cid, created):
    def chunk(text, finish):
        return {"id": cid, "object": "text_completion", "created": created, "model": llm.model_name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
    for piece in pieces:
        yield chunk(piece, None)
    yield chunk("", info["finish_reason"])


def chat_formatter(llm):
    """The Jinja2 chat formatter of this model: the GGUF tokenizer.chat_template, or CHATML_TEMPLATE."""
    if llm._formatter is None:
        Jinja2ChatFormatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter

        vocab = llm._model.vocab

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
        llm._template_source = "gguf" if formatter is not None else "chatml-fallback"
        llm._formatter = formatter or Jinja2ChatFormatter(CHATML_TEMPLATE, eos_token=eos, bos_token=bos)
        llm._bos_text = bos
    return llm._formatter


def render_chat(llm, messages: List[dict]) -> str:
    """The prompt for messages: the model's chat template (falling back to ChatML when it fails)."""
    formatter = chat_formatter(llm)
    try:
        return formatter(messages=messages).prompt
    except Exception:
        if llm._template_source != "gguf":
            raise
        Jinja2ChatFormatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter
        return Jinja2ChatFormatter(CHATML_TEMPLATE, eos_token="", bos_token="")(messages=messages).prompt


def create_chat_completion(llm, messages: List[dict], max_tokens: Optional[int], sampling: dict,
                           stop: Union[str, List[str], None], stream: bool):
    """Chat completion with the dict shape of llama_cpp.Llama.create_chat_completion ("chat.completion";
    with stream=True "chat.completion.chunk" dicts: a first delta {"role": "assistant"}, then {"content"},
    then {} with the finish_reason).

    The conversation stays in the sequence: when the newly rendered prompt extends the text the sequence
    already holds (the previous prompt plus the reply as generated), only the new part is evaluated;
    otherwise the prompt is evaluated from scratch. The KV cache stays bounded however long the history.
    usage.prompt_tokens counts the tokens evaluated by this call (the new part only, when reused). The
    template is the GGUF tokenizer.chat_template, or CHATML_TEMPLATE when there is none or it fails.
    """
    if not messages:
        raise InvalidInputError("messages must not be empty")
    llm._cancel.clear()
    prompt = render_chat(llm, list(messages))
    data = prompt.encode("utf-8", errors="replace")
    spans = content_spans(data, messages)
    held = llm._text
    if held is not None and len(data) > len(held) and data.startswith(bytes(held)):
        tokens = tokenize_chat(llm, data, len(held), spans, False)
        fresh, text = False, data[len(held):]
    else:
        add_bos = not (llm._bos_text and prompt.startswith(llm._bos_text))
        tokens = tokenize_chat(llm, data, 0, spans, add_bos)
        fresh, text = True, data
    info: dict = {}
    stops = stop_list(stop) + ["<|im_end|>"] * (llm._template_source != "gguf")
    pieces = llm._generate(tokens, fresh, max_tokens, sampling, stops, None, text, info)
    cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
    _convert_completion_to_chat = llama_cpp.llama_chat_format._convert_completion_to_chat
    if stream:
        return _convert_completion_to_chat(completion_chunks(llm, pieces, info, cid, created), stream=True)
    reply = "".join(pieces)
    completion = {
        "id": cid, "object": "text_completion", "created": created, "model": llm.model_name,
        "choices": [{"text": reply, "index": 0, "logprobs": None, "finish_reason": info["finish_reason"]}],
        "usage": {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                  "total_tokens": info["prompt_tokens"] + info["completion_tokens"]},
    }
    return _convert_completion_to_chat(completion, stream=False)


def content_spans(data: bytes, messages) -> list:
    """Byte spans of the rendered prompt that hold the messages' contents, found in order (a template that trims
    a content is matched on the trimmed text). A content is the caller's text: special-token text in it must
    stay text, or a user could close the turn and speak for the assistant."""
    spans, cursor = [], 0
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
    return spans


def tokenize_chat(llm, data: bytes, start: int, spans, add_bos: bool) -> list:
    """Tokens of data[start:]: special tokens parsed in the template's own text, never inside a content span."""
    tokens: list = []
    pos = start
    for a, b in spans:
        if b <= start:
            continue
        a = max(a, start)
        if a > pos:
            tokens += llm._model.tokenize(data[pos:a], add_bos and not tokens and pos == start, True)
        tokens += llm._model.tokenize(data[a:b], add_bos and not tokens and a == start, False)
        pos = b
    if pos < len(data) or not tokens:
        tokens += llm._model.tokenize(data[pos:], add_bos and not tokens, True)
    return tokens


def response_format_grammar(response_format: dict):
    """OpenAI's response_format as a grammar: "text" (none), "json_object" (any JSON object; a "schema" key
    narrows it) or "json_schema" ({"json_schema": {"schema": ...}}), with llama-cpp-python's JSON-schema
    converter."""
    if not isinstance(response_format, dict):
        raise InvalidInputError("response_format must be an object with a 'type'")
    kind = response_format.get("type")
    grammars = llama_cpp.llama_grammar
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        if schema is not None:
            _check_schema_size(schema)
        return (grammars.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False) if schema is not None
                else grammars.LlamaGrammar.from_string(grammars.JSON_GBNF, verbose=False))
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidInputError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        _check_schema_size(schema)
        try:
            return grammars.LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        except Exception as e:  # the converter's own errors: a schema it cannot express
            raise InvalidInputError(f"response_format: this JSON schema has no grammar ({e})") from None
    raise InvalidInputError(f"response_format type must be text, json_object or json_schema, not {kind!r}")


# bounds on what a schema may ask of the grammar converter: it unrolls counts, so {"minLength": 10**9} would build
# a grammar of 10^9 rules and exhaust the host's memory (found while checking this path)
_SCHEMA_MAX_COUNT = 1000
_SCHEMA_MAX_NODES = 10000
_SCHEMA_MAX_DEPTH = 64
_COUNT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _check_schema_size(schema) -> None:
    """InvalidInputError for a schema whose grammar would be unbounded in practice: counts or regex repeats above
    _SCHEMA_MAX_COUNT, more than _SCHEMA_MAX_NODES values, or nesting deeper than _SCHEMA_MAX_DEPTH."""
    nodes = 0
    stack = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > _SCHEMA_MAX_NODES or depth > _SCHEMA_MAX_DEPTH:
            raise InvalidInputError("response_format: the JSON schema is too large or too deeply nested")
        if isinstance(node, dict):
            for key in _COUNT_KEYS:
                value = node.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > _SCHEMA_MAX_COUNT:
                    raise InvalidInputError(f"response_format: {key} {value} is above {_SCHEMA_MAX_COUNT}")
            pattern = node.get("pattern")
            if isinstance(pattern, str):
                for m in _QUANTIFIER.finditer(pattern):
                    if any(g and int(g) > _SCHEMA_MAX_COUNT for g in m.groups()):
                        raise InvalidInputError(f"response_format: a pattern repeat above {_SCHEMA_MAX_COUNT}")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
