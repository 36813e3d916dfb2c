"""An OpenAI-compatible HTTP server over one LMInfinite (standard library only).

    lminf serve --n-local 4096 --port 8080
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

Endpoints
  POST /v1/completions       {"prompt": "...", "max_tokens": 16, "stream": false, ...}
  POST /v1/chat/completions  {"messages": [{"role": "user", "content": "..."}], "stream": false, ...}
  GET  /v1/models            the one model served; GET /v1/models/{id} that model (404 for any other id)
  POST /tokenize             {"content": "...", "add_special": false} -> {"tokens": [...]}
  POST /detokenize           {"tokens": [...]} -> {"content": "..."}
  POST /v1/embeddings        {"input": "..." | [...], "encoding_format": "float" | "base64"} (embeddings.py)
  GET  /health               {"status": "ok", "slots_idle": n, "slots_processing": m}
  llama-server's own API (llama_api.py):
  POST /completion           {"prompt", "n_predict", ...} -> {"content", "stop", "stop_type", "timings", ...}
  GET  /props                default generation settings, slots, model, chat template, the LM-Infinite settings
  GET  /slots                per slot: id, is_processing, n_ctx (the window), its cache when last used
  POST /slots/{id}?action=save|restore|erase  {"filename": "..."}: state files in --slot-save-path (else 501)
  GET  /metrics              Prometheus text, llama-server's metric names (with --metrics; else 501)
  GET  /                     the chat page (webui.py; also /index.html; GET /webui/info: its window line and
                             the largest request, max_body_bytes); off with --no-webui (then a 404)
The same paths without the /v1 prefix are accepted too. "stream": true answers with Server-Sent Events,
`data: {chunk}` per piece and `data: [DONE]` at the end. Request fields: max_tokens (or max_completion_tokens),
temperature, top_p, top_k, min_p, repeat_penalty, frequency_penalty, presence_penalty, logit_bias, seed, stop,
stream, stream_options, n, logprobs, for completions echo, best_of (= n) and several or token-id prompts, for
chat top_logprobs, response_format (text, json_object, json_schema: constrained by a grammar), tools,
tool_choice and parallel_tool_calls (tools.py: through the model's chat template), and llama-server's n_predict,
cache_prompt, ignore_eos, id_slot, typical_p, grammar, json_schema, n_probs, samplers and n_keep (0 only), for
chat its return_progress (with "stream": true only, else a 400): before the first delta, a chunk after each
prompt batch, {"id", "object": "chat.completion.chunk", "created", "model", "choices": [], "prompt_progress":
{"total", "cache", "processed", "time_ms"}} (tokens of the conversation, those the slot held already, those
read so far, cache included: processed == total at the end; the chat page's progress bar); model and user are accepted and ignored, and any other field is refused with a 400 that names it (README's
table).
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with status 400, 401, 404, 405, 413
or 500.

Concurrency: the server holds N slots (lminf serve --parallel N, default 1), N LMInfinite sessions over one
shared model, each a llama.cpp context with its own sinks, window and bounded cache (slots.py). Requests are
accepted concurrently (one thread each); each takes a free slot, preferring the one that already holds the
conversation it continues, and with none free waits its turn (first come, first served). A client that
disconnects stops its generation at the next token or prompt batch (LMInfinite.cancel, or the failed write of a
stream) and so frees its slot; one that disconnects while waiting is skipped. (A client that half-closes its
connection after sending the request counts as disconnected.) Slots run in parallel threads: each gets
--threads CPU threads (default: the default thread count divided among the slots, at least one).

A prompt or conversation of any length is accepted: in the LM-Infinite modes the model keeps reading past its
window with bounded memory ("vanilla" mode answers 400 when the context is full). Completions start a fresh
sequence; a chat whose rendered conversation extends the one the context already holds (the previous request's
prompt plus its reply) evaluates only the new messages, any other chat starts afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import math
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional

from .errors import CLIENT_ERRORS, ContextFullError, RemoteServerError
from .httpio import _DISCONNECTS, MAX_BODY_BYTES, RequestError, RequestIO, _bad, _ClientGone
from .options import (CHAT_TEMPERATURE, MAX_LOGPROBS, MAX_N, SAMPLING, add_model_flags, default_threads,
                      engine_kwargs, ignored_options)
from .slots import SlotPool, open_sessions
from . import embeddings, llama_api, tools, webui

__all__ = ["LMInfServer", "make_server", "add_parser", "cmd_serve", "MAX_BODY_BYTES", "MAX_BODIES_BYTES",
           "MAX_QUEUE", "MAX_TOKENS_LIMIT", "PARSED_BODY_COST"]

# the server-wide memory budget of requests, all connections together: bodies being read (their bytes) and parsed
# requests until they end, waiting for a slot or running (PARSED_BODY_COST times their body's bytes: a JSON list of
# token ids takes 6.9x its text once parsed, text 2x; measured in docs/RELIABILITY.md). Past it: 503, Retry-After
MAX_BODIES_BYTES = 1 << 30
PARSED_BODY_COST = 8
# requests waiting for a slot at once (lminf serve --max-queue); past it: 503, Retry-After
MAX_QUEUE = 64
# default cap of max_tokens per request (lminf serve --max-tokens-limit): one request holds the model meanwhile
MAX_TOKENS_LIMIT = 4096

_ROLES = ("system", "user", "assistant", "tool", "function", "developer")


@contextlib.contextmanager
def _engine_errors():
    """Engine exceptions as HTTP errors: the client's mistakes (errors.CLIENT_ERRORS: a value the engine refuses,
    a full vanilla context) -> 400; an RPC server that went away -> 503; anything else is ours -> 500."""
    try:
        yield
    except ContextFullError as e:
        raise _bad(str(e), code="context_length_exceeded") from None
    except CLIENT_ERRORS as e:
        raise _bad(str(e)) from None
    except RemoteServerError as e:
        raise RequestError(503, str(e), code="unavailable") from None
    except (RuntimeError, ValueError, TypeError) as e:
        raise RequestError(500, f"generation failed: {type(e).__name__}: {e}") from None


# -- request validation ---------------------------------------------------------------------------------------

def _number(body: dict, name: str, default, low=None, high=None, integer=False, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _bad(f"'{name}' must be {kind}, not {json.dumps(value)[:40]}", name)
    if isinstance(value, int) and not -2**63 <= value < 2**63:  # 10**400 has no float: OverflowError otherwise
        raise _bad(f"'{name}' is out of range", name)
    if not math.isfinite(value):
        raise _bad(f"'{name}' must be finite", name)
    if low is not None and (value <= low if low_open else value < low):
        raise _bad(f"'{name}' must be {'>' if low_open else '>='} {low}, not {value}", name)
    if high is not None and value > high:
        raise _bad(f"'{name}' must be <= {high}, not {value}", name)
    return int(value) if integer else float(value)


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


# why some fields OpenAI's reference has are refused (README: the table of fields)
_REFUSED = {name: "the legacy function calling: use tools" for name in ("functions", "function_call")}
_REFUSED.update({name: "only text is supported" for name in ("audio", "modalities")})
_REFUSED.update({name: "nothing is stored or tiered here" for name in
                 ("store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier")})


def _known_fields(body: dict, known: set) -> None:
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        why = _REFUSED.get(unknown[0])
        raise _bad(f"unsupported field {unknown[0]!r}" + (f" ({why})" if why else "") +
                   (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "") +
                   "; this server implements: " + ", ".join(sorted(known)), unknown[0])


def _sampling(body: dict, max_tokens_default: Optional[int], temperature_default: float,
              max_tokens_limit: int = MAX_TOKENS_LIMIT) -> dict:
    """Sampling arguments shared by both endpoints, checked and converted to create_*completion keywords."""
    extra = {}  # passed only when given (llama-cpp-python's keyword names)
    n = _number(body, "n", 1, low=1, high=MAX_N, integer=True)
    if n != 1:
        extra["n"] = n
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or \
                not isinstance(options.get("include_usage", False), bool):
            raise _bad("'stream_options' must be {\"include_usage\": true|false}", "stream_options")
        extra["stream_options"] = options
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop] if stop else None
    elif isinstance(stop, list):
        if not all(isinstance(s, str) for s in stop):
            raise _bad("'stop' must be a string or a list of strings", "stop")
        stop = [s for s in stop if s] or None
    elif stop is not None:
        raise _bad("'stop' must be a string or a list of strings", "stop")
    seed = _number(body, "seed", None, integer=True, low=-1, high=2**32 - 1)
    if body.get("max_completion_tokens") is not None:  # OpenAI's newer name (LangChain sends it)
        if body.get("max_tokens") is not None and body["max_tokens"] != body["max_completion_tokens"]:
            raise _bad("'max_tokens' and 'max_completion_tokens' disagree", "max_completion_tokens")
        body = dict(body, max_tokens=body["max_completion_tokens"])
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) is not None:
            extra[name] = _number(body, name, 0.0, low=-2.0, high=2.0)
    if body.get("logit_bias") is not None:
        bias = body["logit_bias"]
        if not isinstance(bias, dict) or len(bias) > 1024:
            raise _bad("'logit_bias' must be an object of at most 1024 token ids", "logit_bias")
        extra["logit_bias"] = {k: _number(bias, k, 0.0, low=-100.0, high=100.0) for k in bias}
    return dict(**extra,
        max_tokens=_number(body, "max_tokens", max_tokens_default, low=1, high=max_tokens_limit, integer=True),
        temperature=_number(body, "temperature", temperature_default, low=0.0),
        top_p=_number(body, "top_p", SAMPLING.top_p, low=0.0, high=1.0),
        top_k=_number(body, "top_k", SAMPLING.top_k, low=0, integer=True),
        min_p=_number(body, "min_p", SAMPLING.min_p, low=0.0, high=1.0),
        repeat_penalty=_number(body, "repeat_penalty", SAMPLING.repeat_penalty, low=0.0, low_open=True),
        seed=None if seed == -1 else seed,
        stop=stop,
        stream=stream,
    )


def parse_completion_request(body: dict, max_tokens_limit: int = MAX_TOKENS_LIMIT,
                             max_tokens_default: Optional[int] = 16) -> dict:
    """Keyword arguments of LMInfinite.create_completion for a /v1/completions body (and llama-server's
    /completion, whose n_predict defaults to -1: max_tokens_default None); "id_slot" is the server's."""
    if "prompt" not in body:
        raise _bad("missing required field 'prompt'", "prompt")
    _known_fields(body, COMPLETION_FIELDS)
    prompt = _prompt(body["prompt"])
    if body.get("suffix"):
        raise _bad("'suffix' (fill in the middle) is not supported", "suffix")
    out = dict(prompt=prompt, **_sampling(body, max_tokens_default, SAMPLING.temperature, max_tokens_limit))
    n_prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    if n_prompts * out.get("n", 1) > MAX_N:
        raise _bad(f"at most {MAX_N} choices per request (prompts x n)", "n")
    best_of = _number(body, "best_of", None, low=1, integer=True)
    if best_of is not None and best_of != out.get("n", 1):
        raise _bad("'best_of' other than n is not supported (every generated choice is returned)", "best_of")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise _bad("'echo' must be a boolean", "echo")
    if echo:
        out["echo"] = True
    logprobs = _number(body, "logprobs", None, low=0, high=MAX_LOGPROBS, integer=True)
    if logprobs is not None:
        out["logprobs"] = logprobs
    return llama_api.extensions(body, out, chat=False, max_tokens_limit=max_tokens_limit)


def _prompt(prompt):
    """A completions prompt: a string, a list of token ids, or a list of several of either (OpenAI's forms)."""
    def one(p, where):
        if isinstance(p, str):
            if not p:
                raise _bad(f"{where} is empty", "prompt")
            return p
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return p
        raise _bad(f"{where} must be a non-empty string or a non-empty list of token ids", "prompt")

    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
        if len(prompt) > MAX_N:
            raise _bad(f"at most {MAX_N} prompts per request", "prompt")
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
                raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
        return "".join(parts)
    raise _bad(f"messages[{i}].content must be a string, a list of text parts or null", f"messages[{i}].content")


def parse_chat_request(body: dict, max_tokens_limit: int = MAX_TOKENS_LIMIT) -> dict:
    """Keyword arguments of LMInfinite.create_chat_completion for a /v1/chat/completions body."""
    if "messages" not in body:
        raise _bad("missing required field 'messages'", "messages")
    _known_fields(body, CHAT_FIELDS)
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(_ROLES)}, not {json.dumps(role)[:40]}",
                       f"messages[{i}].role")
        try:  # tool calls, tool_call_id, name, ...: every field the template can use, or a 400 naming it
            clean.append({"role": role, "content": _content(m, i), **tools.message_fields(m, i)})
        except tools.ToolInputError as e:
            raise _bad(str(e), e.param) from None
    out = dict(messages=clean, **_sampling(body, None, CHAT_TEMPERATURE, max_tokens_limit))
    try:  # checked here for a 400 naming the field; the template's own check comes with the request
        tools.check_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    except tools.ToolInputError as e:
        raise _bad(str(e), e.param) from None
    out.update({k: body[k] for k in ("tools", "tool_choice", "parallel_tool_calls") if body.get(k) is not None})
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise _bad("'logprobs' must be a boolean for chat", "logprobs")
    top = _number(body, "top_logprobs", None, low=0, high=MAX_LOGPROBS, integer=True)
    if top is not None and not logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if logprobs:
        out["logprobs"] = True
        if top is not None:
            out["top_logprobs"] = top
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise _bad("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}",
                       "response_format")
        out["response_format"] = fmt
    return llama_api.extensions(body, out, chat=True, max_tokens_limit=max_tokens_limit)


# -- server -----------------------------------------------------------------------------------------------------

class LMInfServer(ThreadingHTTPServer):
    """ThreadingHTTPServer over one LMInfinite or a SlotPool of several (llm)."""

    daemon_threads = True
    allow_reuse_address = True
    parsed_body_cost = PARSED_BODY_COST

    def __init__(self, llm, host: str = "127.0.0.1", port: int = 8080, *, api_key: Optional[str] = None,
                 model_id: Optional[str] = None, log: bool = False, max_tokens_limit: int = MAX_TOKENS_LIMIT,
                 cors_origins=(), memory_budget: Optional[int] = None, max_queue: int = MAX_QUEUE,
                 webui: bool = True, slot_save_path: Optional[str] = None, metrics: bool = False):
        # one session, or a SlotPool of several over one model (lminf serve --parallel N)
        self.pool = llm if isinstance(llm, SlotPool) else SlotPool([llm])
        self.llm = self.pool.sessions[0]
        self.cors_origins = frozenset(cors_origins or ())  # origins a browser may call from; "*": any
        self.max_tokens_limit = max_tokens_limit
        self._bodies_lock = threading.Lock()
        self._bodies_bytes = 0  # budget in use: bodies being read, parsed requests held (see MAX_BODIES_BYTES)
        self.memory_budget = memory_budget  # None: MAX_BODIES_BYTES, read when used
        self.max_queue = max_queue
        self.webui = webui  # the chat page at GET / (webui.py)
        self._waiting = 0  # requests waiting for a slot now
        self.slot_save_path = slot_save_path  # POST /slots/{id}?action=save|restore: state files there (else 501)
        self.metrics_enabled = metrics  # GET /metrics (else 501, as llama-server without --metrics)
        self.metrics = llama_api.Metrics()  # counted either way (GET /slots reads the slots' cache figures)
        self.api_key = api_key or None
        path = getattr(self.llm, "model_path", None) or "lminf"
        self.model_id = model_id or os.path.basename(str(path))
        self.created = int(time.time())
        self.log = log
        self.stopping = threading.Event()
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)

    @contextlib.contextmanager
    def body_budget(self, n: int):
        """Reserve n bytes of the server-wide request memory budget while the block runs (503 when it is spent):
        a body being read, or a parsed request until it ends (RequestIO holds both)."""
        limit = MAX_BODIES_BYTES if self.memory_budget is None else self.memory_budget
        with self._bodies_lock:
            if self._bodies_bytes + n > limit:
                raise RequestError(503, f"the server holds too many large requests (memory budget {limit >> 20} "
                                   "MiB); retry shortly", code="busy", headers=[("Retry-After", "1")])
            self._bodies_bytes += n
        try:
            yield
        finally:
            with self._bodies_lock:
                self._bodies_bytes -= n

    def waiting(self) -> int:
        """Requests waiting for a slot now (llama-server's requests_deferred)."""
        with self._bodies_lock:
            return self._waiting

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def close_llm(self, timeout: float = 30.0) -> bool:
        """Stop streams at their next piece, wait for the running requests, close the sessions (and the model)."""
        self.stopping.set()
        return self.pool.close(timeout)

    @contextlib.contextmanager
    def session(self, handler: "_Handler", score=None, slot: Optional[int] = None):
        """A free session for handler's request (503 when the server stops, _ClientGone when the client leaves
        while waiting). slot: that slot only (llama-server's id_slot), waited for as llama-server defers it."""
        if slot is not None:
            if not 0 <= slot < len(self.pool):
                raise _bad(f"'id_slot' must be -1 or a slot in [0, {len(self.pool) - 1}], not {slot}", "id_slot")
            wanted = self.pool.sessions[slot]
            score = lambda llm: llm is wanted  # noqa: E731
        with self._bodies_lock:
            if self._waiting >= self.max_queue and self.pool.busy() == len(self.pool):
                raise RequestError(503, f"{self._waiting} requests are waiting for a slot already (--max-queue); "
                                   "retry shortly", code="busy", headers=[("Retry-After", "1")])
            self._waiting += 1
        waiting = True

        def stop_waiting():
            nonlocal waiting
            if waiting:
                waiting = False
                with self._bodies_lock:
                    self._waiting -= 1
        give_up = lambda: self.stopping.is_set() or handler._client_gone()  # noqa: E731
        try:
            while True:
                with self.pool.acquire(score, give_up=give_up) as llm:
                    if slot is None or llm is wanted:
                        stop_waiting()
                        index = self.pool.sessions.index(llm)
                        started = self.metrics.begin(index, llm)
                        try:
                            yield llm
                        finally:
                            self.metrics.end(index, llm, started)
                        return
                if give_up():  # another slot was free, not this one: wait for it
                    raise TimeoutError
                time.sleep(SlotPool.POLL_S / 4)
        except TimeoutError:
            if self.stopping.is_set() or self.pool.closed:
                raise RequestError(503, "the server is shutting down", code="unavailable") from None
            raise _ClientGone() from None
        finally:
            stop_waiting()


def make_server(llm, host: str = "127.0.0.1", port: int = 8080, *, api_key: Optional[str] = None,
                model_id: Optional[str] = None, log: bool = False,
                max_tokens_limit: int = MAX_TOKENS_LIMIT, cors_origins=(), memory_budget: Optional[int] = None,
                max_queue: int = MAX_QUEUE, webui: bool = True, slot_save_path: Optional[str] = None,
                metrics: bool = False) -> LMInfServer:
    """A bound server (not yet serving: call serve_forever(), e.g. in a thread); port 0 picks a free port.
    cors_origins: the browser origins allowed to call it ("https://app.example", or "*" for any); none by default,
    so that a web page cannot use a model served on the user's machine. memory_budget (bytes; None:
    MAX_BODIES_BYTES) and max_queue bound the requests held at once (503 with Retry-After past either). webui:
    the chat page at GET / (False: a 404 there). slot_save_path: the directory of POST /slots/{id}?action=save|restore
    (None: 501); metrics: GET /metrics (False: 501), as llama-server's --slot-save-path and --metrics."""
    return LMInfServer(llm, host, port, api_key=api_key, model_id=model_id, log=log,
                       max_tokens_limit=max_tokens_limit, cors_origins=cors_origins, memory_budget=memory_budget,
                       max_queue=max_queue, webui=webui, slot_save_path=slot_save_path, metrics=metrics)


class _Handler(RequestIO, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lminf"
    # seconds a socket operation may block: idle keep-alive connections and clients that stop reading a stream
    # are dropped after this (a stalled stream then frees its slot like a disconnect)
    timeout = 600
    server: LMInfServer

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (malformed request line, unsupported method, ...) as JSON too."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send_error(RequestError(code, message or phrase, code=phrase.lower().replace(" ", "_")))

    # -- plumbing ---------------------------------------------------------------------------------------------

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        if self.server.log:
            sys.stderr.write(f"{self.address_string()} - [{self.log_date_time_string()}] {format % args}\n")

    def _send_json(self, status: int, obj: Any, extra_headers=()) -> None:
        data = json.dumps(obj).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in self._cors_headers() + list(extra_headers):
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":  # a HEAD response has the headers of the answer and no body
                self.wfile.write(data)
        except _DISCONNECTS:
            self.close_connection = True

    def _send_error(self, err: RequestError) -> None:
        headers = ([("WWW-Authenticate", "Bearer")] if err.status == 401 else []) + list(getattr(err, "headers", []))
        # the request body may not have been read (whole): do not reuse the connection
        self.close_connection = True
        self._send_json(err.status, err.body(), headers + [("Connection", "close")])

    def _client_gone(self) -> bool:
        """True when the client has closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _authorised(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def _route(self) -> str:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path.startswith("/v1/"):
            path = path[3:]
        return path

    # -- methods ----------------------------------------------------------------------------------------------

    _GET = {"/models": "_models", "/health": "_health", "/": "_webui", "/index.html": "_webui",
            "/webui/info": "_webui_info"}
    _POST = {"/completions": "_completions", "/chat/completions": "_chat", "/tokenize": "_tokenize",
             "/detokenize": "_detokenize", "/embeddings": "_embeddings"}
    # llama-server's own API (llama_api.py); POST /slots/{id}?action=... is matched in _dispatch_held
    _GET.update({"/props": "_props", "/slots": "_slots", "/metrics": "_metrics"})
    _POST.update({"/completion": "_completion_llama", "/slots/{id}": "_slot_action"})

    def _dispatch(self, method: str) -> None:
        self._streaming = False
        # the parsed request's share of the memory budget is held until the request ends (RequestIO._read_body)
        with contextlib.ExitStack() as self._held:
            self._dispatch_held(method)

    def _dispatch_held(self, method: str) -> None:
        route = self._route()
        if method == "OPTIONS":
            return self._preflight(route)
        if route.startswith("/models/") and method == "GET":
            route = "/models/{id}"
        elif route.startswith("/slots/") and method == "POST":
            route = "/slots/{id}"
        table = self._GET if method == "GET" else self._POST if method == "POST" else {}
        if route == "/models/{id}" and method == "GET":
            table = {route: "_model"}
        try:
            if route not in table:
                if route in self._GET or route in self._POST:
                    allowed = "GET" if route in self._GET else "POST"
                    raise RequestError(405, f"{method} is not allowed on {self.path}; use {allowed}",
                                       code="method_not_allowed", headers=[("Allow", allowed)])
                raise RequestError(404, f"unknown path {self.path}", code="not_found")
            if route != "/health" and route not in webui.ROUTES and not self._authorised():
                raise RequestError(401, "missing or incorrect API key (Authorization: Bearer ...)",
                                   code="invalid_api_key")
            getattr(self, table[route])()
        except RequestError as e:
            self._send_error(e)
        except (_ClientGone, *_DISCONNECTS):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 (a bug must not drop the connection without an answer)
            traceback.print_exc()
            if self._streaming:
                self.close_connection = True
            else:
                self._send_error(RequestError(500, f"internal error: {type(e).__name__}: {e}"))

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self):  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self):  # noqa: N802
        self._dispatch("PATCH")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    def do_OPTIONS(self):  # noqa: N802
        self._dispatch("OPTIONS")

    # -- endpoints ---------------------------------------------------------------------------------------------

    def _health(self) -> None:
        """{"status": "ok", "slots_idle", "slots_processing"} (llama.cpp server's fields)."""
        busy = self.server.pool.busy()
        self._send_json(200, {"status": "ok", "slots_idle": len(self.server.pool) - busy, "slots_processing": busy})

    def _webui(self) -> None:
        webui.serve_page(self)

    def _webui_info(self) -> None:
        webui.serve_info(self)

    def _models(self) -> None:
        s = self.server
        self._send_json(200, {"object": "list", "data": [
            {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "lminf", "permissions": []}]})

    def _model(self) -> None:
        s = self.server
        wanted = self._route()[len("/models/"):]
        if wanted != s.model_id:
            raise RequestError(404, f"no model {wanted!r} here; this server serves {s.model_id!r}",
                               code="model_not_found")
        self._send_json(200, {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "lminf"})

    def _tokenize(self) -> None:
        """llama.cpp server's shape: {"content": text, "add_special", "parse_special", "with_pieces": bool} ->
        {"tokens": [ids]} (with_pieces: [{"id", "piece"}]); special-token text is text unless parse_special."""
        text, add, special, with_pieces = llama_api.tokenize_args(self._read_body())
        with self.server.session(self) as llm, _engine_errors():
            tokens = llm.tokenize(text, add_bos=add, special=True) if special else llm.tokenize(text, add_bos=add)
            reply = llama_api.tokenize_reply(llm, tokens, with_pieces)
        self._send_json(200, reply)

    def _detokenize(self) -> None:
        """{"tokens": [ids]} -> {"content": text}."""
        body = self._read_body()
        tokens = body.get("tokens")
        if set(body) - {"tokens"}:
            raise _bad(f"unsupported field {sorted(set(body) - {'tokens'})[0]!r}; /detokenize takes 'tokens'")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise _bad("'tokens' must be a list of integers", "tokens")
        with self.server.session(self) as llm, _engine_errors():
            text = llm.detokenize(tokens)
        self._send_json(200, {"content": text})

    def _embeddings(self) -> None:
        """OpenAI's /v1/embeddings (embeddings.py)."""
        kwargs = embeddings.parse_request(self._read_body())

        def check(done, index):  # after each batch: a shutdown, or a client that left, stops the embedding
            if self.server.stopping.is_set():
                raise RequestError(503, "the server is shutting down", code="unavailable")
            if self._client_gone():
                raise _ClientGone()
        with self.server.session(self) as llm, _engine_errors():
            result = llm.create_embedding(**kwargs, progress=check)
        self._send_json(200, self._named(result))

    def _completions(self) -> None:
        kwargs = parse_completion_request(self._read_body(), self.server.max_tokens_limit)
        self._run("create_completion", kwargs)

    def _chat(self) -> None:
        kwargs = parse_chat_request(self._read_body(), self.server.max_tokens_limit)
        self._run("create_chat_completion", kwargs)

    # -- llama-server's API (llama_api.py) --------------------------------------------------------------------

    def _completion_llama(self) -> None:
        """llama-server's POST /completion: its fields, its response and stream shapes."""
        body = self._read_body()
        llama_api.check_completion(body)
        kwargs = parse_completion_request(body, self.server.max_tokens_limit, max_tokens_default=None)
        if kwargs["stream"]:
            kwargs["stream_options"] = {"include_usage": True}  # the counts of the final chunk
        self._run("create_completion", kwargs, llama_api.completion_shaper(self.server, kwargs, kwargs["prompt"]))

    def _props(self) -> None:
        self._send_json(200, llama_api.props(self.server))

    def _slots(self) -> None:
        self._send_json(200, llama_api.slots(self.server))

    def _slot_action(self) -> None:
        """POST /slots/{id}?action=save|restore|erase (--slot-save-path); a busy slot is waited for."""
        s = self.server
        slot, action = llama_api.slot_action_args(self.path, self._route(), s.slot_save_path)
        body = self._read_body() if action != "erase" or self.headers.get("Content-Length", "0") != "0" else {}
        with s.session(self, slot=slot) as llm, _engine_errors():
            reply = llama_api.slot_action(llm, slot, action, body, s.slot_save_path)
        self._send_json(200, reply)

    def _metrics(self) -> None:
        llama_api.serve_metrics(self)

    def _run(self, method: str, kwargs: dict, shape=None) -> None:
        """Generate in a slot and answer; shape(llm) (llama_api.completion_shaper) may reshape the result or the
        stream of chunks, which then ends without data: [DONE] (llama-server's /completion stream)."""
        s = self.server
        # a chat goes to the slot that holds its conversation, if one does
        score = _held_prefix_score(kwargs["messages"], kwargs.get("tools"), kwargs.get("tool_choice")) \
            if method == "create_chat_completion" else None
        slot = kwargs.pop("id_slot", None)
        result = None
        with s.session(self, score, slot) as llm:
            if s.stopping.is_set():
                raise RequestError(503, "the server is shutting down", code="unavailable")
            if self._client_gone():
                raise _ClientGone()
            create = getattr(llm, method)
            with _engine_errors():
                reshape = shape(llm) if shape is not None else (lambda out: out)
            with _Watch(self, llm):
                if not kwargs["stream"]:
                    result = reshape(self._call(create, kwargs))
                else:
                    chunks = self._call(create, kwargs)
                    try:
                        self._stream(reshape(chunks), done=shape is None)
                    finally:
                        close = getattr(chunks, "close", None)
                        if close:
                            close()  # stops the generation (GeneratorExit) while the slot is still held
        if result is not None:
            # answered once the slot is free again: a client's next request (or /slots) finds it idle
            self._send_json(200, self._named(result))

    @staticmethod
    def _call(create, kwargs):
        with _engine_errors():
            return create(**kwargs)

    def _named(self, obj: dict) -> dict:
        if isinstance(obj, dict) and "model" in obj:
            obj["model"] = self.server.model_id
        return obj

    def _stream(self, chunks: Iterator[dict], done: bool = True) -> None:
        it = iter(chunks)
        # the first chunk comes before the headers, so that a bad request is still answered with a 400
        with _engine_errors():
            first = next(it, None)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        for k, v in self._cors_headers():
            self.send_header(k, v)
        self.end_headers()
        self._streaming = True
        self.close_connection = True  # the body ends when the connection closes
        chunk = first
        # on shutdown, an engine with cancel() ends the stream itself (finish_reason "cancelled"); others stop here
        cancels = hasattr(self.server.llm, "cancel")
        try:
            while chunk is not None:
                if self._client_gone():
                    return
                self.wfile.write(b"data: " + json.dumps(self._named(chunk)).encode("utf-8") + b"\n\n")
                if self.server.stopping.is_set() and not cancels:
                    break
                chunk = next(it, None)
        except _DISCONNECTS:
            return  # the client went away: the caller closes the generator
        except Exception as e:  # noqa: BLE001 (after the headers the error can only be reported in the stream)
            err = RequestError(500, f"generation failed: {e}")
            self.wfile.write(b"data: " + json.dumps(err.body()).encode("utf-8") + b"\n\n")
        if done:
            self.wfile.write(b"data: [DONE]\n\n")


def _held_prefix_score(messages, tools=None, tool_choice=None):
    rendered = {}  # the slots share one model and template: the conversation is rendered once per request

    def score(llm):
        held = getattr(llm, "held_prefix", None)
        if not held:
            return 0
        return held(messages, rendered, tools, tool_choice) if tools else held(messages, rendered)
    return score


class _Watch:
    """While a request generates, cancel it (LMInfinite.cancel) when its client disconnects or the server stops:
    covers prompt evaluation and non-streamed replies, where no write would notice the closed connection."""

    POLL_S = 0.1

    def __init__(self, handler: _Handler, llm):
        self.handler = handler
        self.cancel = getattr(llm, "cancel", None)
        self.done = threading.Event()
        self.thread = None

    def __enter__(self):
        if self.cancel is not None:
            self.thread = threading.Thread(target=self._watch, name="lminf-watch", daemon=True)
            self.thread.start()
        return self

    def _watch(self):
        while not self.done.wait(self.POLL_S):
            if self.handler.server.stopping.is_set() or self.handler._client_gone():
                self.cancel()
                return

    def __exit__(self, *exc):
        self.done.set()
        if self.thread is not None:
            self.thread.join()


# -- command line -----------------------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `lminf serve` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models)",
        description="Serve one model over an OpenAI-compatible HTTP API. --parallel N slots answer N requests at "
                    "once (one llama.cpp context each, one copy of the weights); conversations longer than the "
                    "window are read with LM-Infinite.")
    add_model_flags(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("LMINF_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LMINF_API_KEY, else no check)")
    p.add_argument("--alias", help="model id reported by the API (default: the model file name)")
    p.add_argument("--quiet", action="store_true", help="do not log requests")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000; '*' for any) call the server from a "
                        "browser (CORS); repeat for several. Default: none")
    p.add_argument("--parallel", "-np", type=int, default=1, metavar="N",
                   help="slots: N conversations served at once, each with its own bounded cache, on one copy of the "
                        "weights (default 1); --threads is then per slot (default: the default divided among them)")
    p.add_argument("--memory-budget-mb", type=int, default=MAX_BODIES_BYTES >> 20, metavar="MB",
                   help=f"memory for requests held at once: bodies being read and parsed requests waiting or "
                        f"running, counted at {PARSED_BODY_COST}x their body size (default {MAX_BODIES_BYTES >> 20}); "
                        "503 with Retry-After past it")
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE, metavar="N",
                   help=f"requests that may wait for a busy slot at once (default {MAX_QUEUE}); 503 past it")
    p.add_argument("--max-tokens-limit", type=int, default=MAX_TOKENS_LIMIT,
                   help=f"largest max_tokens a request may ask for (default {MAX_TOKENS_LIMIT}; a request holds the "
                        "model while it generates)")
    p.add_argument("--slot-save-path", metavar="DIR",
                   help="allow POST /slots/{id}?action=save|restore|erase, with state files in DIR (llama-server's "
                        "flag; default: off, 501)")
    p.add_argument("--metrics", action="store_true",
                   help="serve GET /metrics in Prometheus text format (default: off, 501; llama-server's flag)")
    p.add_argument("--no-webui", action="store_true",
                   help="do not serve the chat page at / (a browser opening the address gets a 404)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    from .engine import LMInfinite

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, not {args.port}")
    for warning in ignored_options(args):
        sys.stderr.write(f"lminf: warning: {warning}\n")
    if args.max_tokens_limit < 1:
        raise ValueError(f"--max-tokens-limit must be >= 1, not {args.max_tokens_limit}")
    if args.parallel < 1:
        raise ValueError(f"--parallel must be >= 1, not {args.parallel}")
    if args.memory_budget_mb < 1 or args.max_queue < 0:
        raise ValueError("--memory-budget-mb must be >= 1 and --max-queue >= 0")
    if args.slot_save_path is not None and not os.path.isdir(args.slot_save_path):
        raise ValueError(f"--slot-save-path is not a directory: {args.slot_save_path}")
    kwargs = engine_kwargs(args)
    if args.parallel == 1:
        llm = target = LMInfinite(args.model, **kwargs)
    else:
        if kwargs["n_threads"] is None:  # the slots decode at once: together no more threads than one would use
            kwargs["n_threads"] = max(1, default_threads() // args.parallel)
        target = open_sessions(args.model, args.parallel, **kwargs)
        llm = target.sessions[0]
    try:
        server = make_server(target, args.host, args.port, api_key=args.api_key, model_id=args.alias,
                             log=not args.quiet, max_tokens_limit=args.max_tokens_limit,
                             cors_origins=args.cors_origin, memory_budget=args.memory_budget_mb << 20,
                             max_queue=args.max_queue, webui=not args.no_webui,
                             slot_save_path=args.slot_save_path, metrics=args.metrics)
    except OSError:
        target.close() if isinstance(target, SlotPool) else llm.close()
        raise

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() \
        else None
    sys.stderr.write(f"lminf: serving {server.model_id} ({llm.mode}, G = {llm.n_global}, L = {llm.n_local}, "
                     f"{args.parallel} slot{'s' * (args.parallel > 1)}) "
                     f"on {server.url}/v1 {'(API key required) ' if server.api_key else ''}- Ctrl-C to stop\n")
    if server.webui:
        sys.stderr.write(f"lminf: chat page: open {server.url}/ in a browser\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.stderr.write("\nlminf: shutting down\n")
    finally:
        server.server_close()
        if not server.close_llm(timeout=30.0):
            sys.stderr.write("lminf: a request is still running; exiting without closing the model\n")
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
