"""The HTTP side of `lminf serve` (server.py describes the API): LMInfServer, the request handler's routes, the
streams, the slots each request waits for and the server-wide budgets of requests held at once. Request bodies
are read by httpio.RequestIO and checked by schema.py; llama-server's own endpoints answer in llama_api.py."""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import select
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional

from . import embeddings, llama_api, webui
from .errors import CLIENT_ERRORS, ContextFullError, RemoteServerError
from .httpio import DISCONNECTS, ClientGone, RequestError, RequestIO, bad_request
from .schema import MAX_TOKENS_LIMIT, parse_chat_request, parse_completion_request
from .slots import SlotPool

__all__ = ["LMInfServer", "Handler", "make_server", "held_prefix_score", "MAX_BODIES_BYTES", "PARSED_BODY_COST",
           "MAX_QUEUE"]

# the server-wide memory budget of requests, all connections together: bodies being read (their bytes) and parsed
# requests until they end, waiting for a slot or running (PARSED_BODY_COST times their body's bytes: a JSON list of
# token ids takes 6.9x its text once parsed, text 2x; measured in docs/RELIABILITY.md). Past it: 503, Retry-After
MAX_BODIES_BYTES = 1 << 30
PARSED_BODY_COST = 8
# requests waiting for a slot at once (lminf serve --max-queue); past it: 503, Retry-After
MAX_QUEUE = 64


@contextlib.contextmanager
def _engine_errors():
    """Engine exceptions as HTTP errors: the client's mistakes (errors.CLIENT_ERRORS: a value the engine refuses,
    a full vanilla context) -> 400; an RPC server that went away -> 503; anything else is ours -> 500."""
    try:
        yield
    except ContextFullError as e:
        raise bad_request(str(e), code="context_length_exceeded") from None
    except CLIENT_ERRORS as e:
        raise bad_request(str(e), getattr(e, "param", None)) from None
    except RemoteServerError as e:
        raise RequestError(503, str(e), code="unavailable") from None
    except (RuntimeError, ValueError, TypeError) as e:
        raise RequestError(500, f"generation failed: {type(e).__name__}: {e}") from None


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
        super().__init__((host, port), Handler)

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
    def session(self, handler: "Handler", score=None, slot: Optional[int] = None):
        """A free session for handler's request (503 when the server stops, ClientGone when the client leaves
        while waiting). slot: that slot only (llama-server's id_slot), waited for as llama-server defers it."""
        if slot is not None:
            if not 0 <= slot < len(self.pool):
                raise bad_request(f"'id_slot' must be -1 or a slot in [0, {len(self.pool) - 1}], not {slot}", "id_slot")
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
        give_up = lambda: self.stopping.is_set() or handler.client_gone()  # noqa: E731
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
            raise ClientGone() from None
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


class Handler(RequestIO, BaseHTTPRequestHandler):
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

    def send_json(self, status: int, obj: Any, extra_headers=()) -> None:
        data = json.dumps(obj).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in self.cors_headers() + list(extra_headers):
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":  # a HEAD response has the headers of the answer and no body
                self.wfile.write(data)
        except DISCONNECTS:
            self.close_connection = True

    def _send_error(self, err: RequestError) -> None:
        headers = ([("WWW-Authenticate", "Bearer")] if err.status == 401 else []) + list(getattr(err, "headers", []))
        # the request body may not have been read (whole): do not reuse the connection
        self.close_connection = True
        self.send_json(err.status, err.body(), headers + [("Connection", "close")])

    def client_gone(self) -> bool:
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
        except (ClientGone, *DISCONNECTS):
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
        self.send_json(200, {"status": "ok", "slots_idle": len(self.server.pool) - busy, "slots_processing": busy})

    def _webui(self) -> None:
        webui.serve_page(self)

    def _webui_info(self) -> None:
        webui.serve_info(self)

    def _models(self) -> None:
        s = self.server
        self.send_json(200, {"object": "list", "data": [
            {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "lminf", "permissions": []}]})

    def _model(self) -> None:
        s = self.server
        wanted = self._route()[len("/models/"):]
        if wanted != s.model_id:
            raise RequestError(404, f"no model {wanted!r} here; this server serves {s.model_id!r}",
                               code="model_not_found")
        self.send_json(200, {"id": s.model_id, "object": "model", "created": s.created, "owned_by": "lminf"})

    def _tokenize(self) -> None:
        """llama.cpp server's shape: {"content": text, "add_special", "parse_special", "with_pieces": bool} ->
        {"tokens": [ids]} (with_pieces: [{"id", "piece"}]); special-token text is text unless parse_special."""
        text, add, special, with_pieces = llama_api.tokenize_args(self._read_body())
        with self.server.session(self) as llm, _engine_errors():
            tokens = llm.tokenize(text, add_bos=add, special=True) if special else llm.tokenize(text, add_bos=add)
            reply = llama_api.tokenize_reply(llm, tokens, with_pieces)
        self.send_json(200, reply)

    def _detokenize(self) -> None:
        """{"tokens": [ids]} -> {"content": text}."""
        body = self._read_body()
        tokens = body.get("tokens")
        if set(body) - {"tokens"}:
            raise bad_request(f"unsupported field {sorted(set(body) - {'tokens'})[0]!r}; /detokenize takes 'tokens'")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad_request("'tokens' must be a list of integers", "tokens")
        with self.server.session(self) as llm, _engine_errors():
            text = llm.detokenize(tokens)
        self.send_json(200, {"content": text})

    def _embeddings(self) -> None:
        """OpenAI's /v1/embeddings (embeddings.py)."""
        kwargs = embeddings.parse_request(self._read_body())

        def check(done, index):  # after each batch: a shutdown, or a client that left, stops the embedding
            if self.server.stopping.is_set():
                raise RequestError(503, "the server is shutting down", code="unavailable")
            if self.client_gone():
                raise ClientGone()
        with self.server.session(self) as llm, _engine_errors():
            result = llm.create_embedding(**kwargs, progress=check)
        self.send_json(200, self._named(result))

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
        self.send_json(200, llama_api.props(self.server))

    def _slots(self) -> None:
        self.send_json(200, llama_api.slots(self.server))

    def _slot_action(self) -> None:
        """POST /slots/{id}?action=save|restore|erase (--slot-save-path); a busy slot is waited for."""
        s = self.server
        slot, action = llama_api.slot_action_args(self.path, self._route(), s.slot_save_path)
        body = self._read_body() if action != "erase" or self.headers.get("Content-Length", "0") != "0" else {}
        with s.session(self, slot=slot) as llm, _engine_errors():
            reply = llama_api.slot_action(llm, slot, action, body, s.slot_save_path)
        self.send_json(200, reply)

    def _metrics(self) -> None:
        llama_api.serve_metrics(self)

    def _run(self, method: str, kwargs: dict, shape=None) -> None:
        """Generate in a slot and answer; shape(llm) (llama_api.completion_shaper) may reshape the result or the
        stream of chunks, which then ends without data: [DONE] (llama-server's /completion stream)."""
        s = self.server
        # a chat goes to the slot that holds its conversation, if one does
        score = held_prefix_score(kwargs["messages"], kwargs.get("tools"), kwargs.get("tool_choice")) \
            if method == "create_chat_completion" else None
        slot = kwargs.pop("id_slot", None)
        result = None
        with s.session(self, score, slot) as llm:
            if s.stopping.is_set():
                raise RequestError(503, "the server is shutting down", code="unavailable")
            if self.client_gone():
                raise ClientGone()
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
            self.send_json(200, self._named(result))

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
        for k, v in self.cors_headers():
            self.send_header(k, v)
        self.end_headers()
        self._streaming = True
        self.close_connection = True  # the body ends when the connection closes
        chunk = first
        # on shutdown, an engine with cancel() ends the stream itself (finish_reason "cancelled"); others stop here
        cancels = hasattr(self.server.llm, "cancel")
        try:
            while chunk is not None:
                if self.client_gone():
                    return
                self.wfile.write(b"data: " + json.dumps(self._named(chunk)).encode("utf-8") + b"\n\n")
                if self.server.stopping.is_set() and not cancels:
                    break
                chunk = next(it, None)
        except DISCONNECTS:
            return  # the client went away: the caller closes the generator
        except Exception as e:  # noqa: BLE001 (after the headers the error can only be reported in the stream)
            err = RequestError(500, f"generation failed: {e}")
            self.wfile.write(b"data: " + json.dumps(err.body()).encode("utf-8") + b"\n\n")
        if done:
            self.wfile.write(b"data: [DONE]\n\n")


def held_prefix_score(messages, tools=None, tool_choice=None):
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

    def __init__(self, handler: Handler, llm):
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
            if self.handler.server.stopping.is_set() or self.handler.client_gone():
                self.cancel()
                return

    def __exit__(self, *exc):
        self.done.set()
        if self.thread is not None:
            self.thread.join()
