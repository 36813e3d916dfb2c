"""The request schema of `lminf serve`'s OpenAI routes (server.py lists them): the fields /v1/completions and
/v1/chat/completions accept, and the checks that turn a request body into create_completion /
create_chat_completion keywords, a 400 naming the field otherwise. The sampling settings and the request options
that the Python API takes too (n, stream_options, logprobs) are checked by options.py's one check each;
llama-server's extension fields by llama_api.extensions."""

from __future__ import annotations

import json
from typing import Optional

from . import llama_api, tools
from .httpio import bad_request, body_number, field_errors, known_fields
from .options import (CHAT_SAMPLING, MAX_LOGIT_BIAS, MAX_N, SAMPLING, SAMPLING_FIELDS, Sampling, check_chat_logprobs,
                      check_n, check_logprobs, include_usage)

__all__ = ["MAX_TOKENS_LIMIT", "ROLES", "COMPLETION_FIELDS", "CHAT_FIELDS", "SAMPLING_REQUEST_FIELDS",
           "parse_completion_request", "parse_chat_request"]

# default cap of max_tokens per request (lminf serve --max-tokens-limit): one request holds the model meanwhile
MAX_TOKENS_LIMIT = 4096

ROLES = ("system", "user", "assistant", "tool", "function", "developer")

# the request fields each endpoint understands; any other field is refused with a 400 that names it, so that
# nothing a client relies on (tools, logprobs, stream_options, ...) is dropped silently. "model" and "user" are
# accepted and ignored: one model is served, and nothing is accounted per user.
_COMMON_FIELDS = {"model", "user", "n", "stream", "stream_options", "stop", "seed", "max_tokens",
                  "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                  "frequency_penalty", "presence_penalty", "logit_bias", "logprobs"}
# llama-server's extension fields are accepted on both (llama_api.EXTENSION_FIELDS: n_predict, grammar, id_slot, ...)
COMPLETION_FIELDS = _COMMON_FIELDS | llama_api.EXTENSION_FIELDS | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = _COMMON_FIELDS | llama_api.EXTENSION_FIELDS | llama_api.CHAT_EXTENSION_FIELDS | {
    "messages", "response_format", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"}

# the request fields that are Sampling settings (options.Sampling; its grammar comes from llama-server's grammar
# and json_schema fields or response_format); the engine gets _ALWAYS whatever the body says (create_*completion's
# core keywords), the others when the body sets them to something other than their default
SAMPLING_REQUEST_FIELDS = tuple(name for name in SAMPLING_FIELDS if name != "grammar")
_ALWAYS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")

# why some fields OpenAI's reference has are refused (README: the table of fields)
_REFUSED = {name: "the legacy function calling: use tools" for name in ("functions", "function_call")}
_REFUSED.update({name: "only text is supported" for name in ("audio", "modalities")})
_REFUSED.update({name: "nothing is stored or tiered here" for name in
                 ("store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier")})


def _sampling(body: dict, base: Sampling) -> dict:
    """The body's sampling settings checked (Sampling.checked, the engine's own check) as keywords: _ALWAYS,
    and the others the body sets to something other than base's."""
    bias = body.get("logit_bias")
    if bias is not None and (not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS):
        raise bad_request(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids", "logit_bias")
    given = {name: body[name] for name in SAMPLING_REQUEST_FIELDS if body.get(name) is not None}
    with field_errors():
        checked = Sampling.checked(base, **given)
    return {name: getattr(checked, name) for name in SAMPLING_REQUEST_FIELDS
            if name in _ALWAYS or (name in given and getattr(checked, name) != getattr(base, name))}


def _common(body: dict, max_tokens_default: Optional[int], base: Sampling, max_tokens_limit: int) -> dict:
    """The fields both routes share, checked and converted to create_*completion keywords."""
    extra = {}  # passed only when given (llama-cpp-python's keyword names)
    with field_errors():
        n = 1 if body.get("n") is None else check_n(body["n"])
    if n != 1:
        extra["n"] = n
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None:
        with field_errors():
            include_usage(stream, options)
        extra["stream_options"] = options
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop] if stop else None
    elif isinstance(stop, list):
        if not all(isinstance(s, str) for s in stop):
            raise bad_request("'stop' must be a string or a list of strings", "stop")
        stop = [s for s in stop if s] or None
    elif stop is not None:
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if body.get("max_completion_tokens") is not None:  # OpenAI's newer name (LangChain sends it)
        if body.get("max_tokens") is not None and body["max_tokens"] != body["max_completion_tokens"]:
            raise bad_request("'max_tokens' and 'max_completion_tokens' disagree", "max_completion_tokens")
        body = dict(body, max_tokens=body["max_completion_tokens"])
    return dict(**extra, **_sampling(body, base),
                max_tokens=body_number(body, "max_tokens", max_tokens_default, 1, max_tokens_limit, integer=True),
                stop=stop, stream=stream)


def parse_completion_request(body: dict, max_tokens_limit: int = MAX_TOKENS_LIMIT,
                             max_tokens_default: Optional[int] = 16) -> dict:
    """Keyword arguments of LMInfinite.create_completion for a /v1/completions body (and llama-server's
    /completion, whose n_predict defaults to -1: max_tokens_default None); "id_slot" is the server's."""
    if "prompt" not in body:
        raise bad_request("missing required field 'prompt'", "prompt")
    known_fields(body, COMPLETION_FIELDS, why=_REFUSED)
    prompt = _prompt(body["prompt"])
    if body.get("suffix"):
        raise bad_request("'suffix' (fill in the middle) is not supported", "suffix")
    out = dict(prompt=prompt, **_common(body, max_tokens_default, SAMPLING, max_tokens_limit))
    n_prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    if n_prompts * out.get("n", 1) > MAX_N:
        raise bad_request(f"at most {MAX_N} choices per request (prompts x n)", "n")
    best_of = body_number(body, "best_of", None, 1, integer=True)
    if best_of is not None and best_of != out.get("n", 1):
        raise bad_request("'best_of' other than n is not supported (every generated choice is returned)", "best_of")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise bad_request("'echo' must be a boolean", "echo")
    if echo:
        out["echo"] = True
    with field_errors():
        logprobs = check_logprobs(body.get("logprobs"))
    if logprobs is not None:
        out["logprobs"] = logprobs
    return llama_api.extensions(body, out, chat=False, max_tokens_limit=max_tokens_limit)


def _prompt(prompt):
    """A completions prompt: a string, a list of token ids, or a list of several of either (OpenAI's forms)."""
    def one(p, where):
        if isinstance(p, str):
            if not p:
                raise bad_request(f"{where} is empty", "prompt")
            return p
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return p
        raise bad_request(f"{where} must be a non-empty string or a non-empty list of token ids", "prompt")

    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
        if len(prompt) > MAX_N:
            raise bad_request(f"at most {MAX_N} prompts per request", "prompt")
        items = [one(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        return items[0] if len(items) == 1 else items
    return one(prompt, "'prompt'")


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise bad_request(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        return "".join(parts)
    raise bad_request(f"messages[{i}].content must be a string, a list of text parts or null", f"messages[{i}].content")


def parse_chat_request(body: dict, max_tokens_limit: int = MAX_TOKENS_LIMIT) -> dict:
    """Keyword arguments of LMInfinite.create_chat_completion for a /v1/chat/completions body."""
    if "messages" not in body:
        raise bad_request("missing required field 'messages'", "messages")
    known_fields(body, CHAT_FIELDS, why=_REFUSED)
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {json.dumps(role)[:40]}",
                              f"messages[{i}].role")
        with field_errors():  # tool calls, tool_call_id, name, ...: every field the template can use, or a 400
            clean.append({"role": role, "content": _content(m, i), **tools.message_fields(m, i)})
    out = dict(messages=clean, **_common(body, None, CHAT_SAMPLING, max_tokens_limit))
    with field_errors():  # checked here for a 400 naming the field; the template's own check comes with the request
        tools.check_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    out.update({k: body[k] for k in ("tools", "tool_choice", "parallel_tool_calls") if body.get(k) is not None})
    with field_errors():
        k = check_chat_logprobs(body.get("logprobs"), body.get("top_logprobs"))
    if k is not None:
        out["logprobs"] = True
        if body.get("top_logprobs") is not None:
            out["top_logprobs"] = k
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise bad_request("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}",
                              "response_format")
        out["response_format"] = fmt
    return llama_api.extensions(body, out, chat=True, max_tokens_limit=max_tokens_limit)
