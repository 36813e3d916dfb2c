"""The HTTP side of `lminf serve` that is not about the model: request bodies (JSON, Content-Length or chunked,
bounded), CORS (allowed origins, preflights) and the errors answered to clients. RequestIO is a mixin of the
server's request handler (it uses the handler's headers, rfile, server and route tables)."""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Optional

from .errors import InvalidInputError
from .options import check_number

# a request body larger than this is refused with 413 (prompts of any length are the point, but not unbounded
# memory for one request)
MAX_BODY_BYTES = 64 << 20

DISCONNECTS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)


class RequestError(Exception):
    """An error answered to the client: HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: Optional[str] = None, headers=()):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = list(headers)  # extra response headers (Allow on a 405, Retry-After on a 503)
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> RequestError:
    """A 400 naming the request field it is about (param)."""
    return RequestError(400, message, param, code)


def known_fields(body: dict, known, implements: str = "this server", why: Optional[dict] = None) -> None:
    """A 400 naming the first field of body that is not in known (why: a reason per refused field), with the count
    of the others and the list of what `implements` takes."""
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        reason = (why or {}).get(unknown[0])
        raise bad_request(f"unsupported field {unknown[0]!r}" + (f" ({reason})" if reason else "") +
                          (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "") +
                          f"; {implements} implements: " + ", ".join(sorted(known)), unknown[0])


@contextlib.contextmanager
def field_errors():
    """An InvalidInputError of a field check (options' checks, tools.check_tools) as a 400 naming its param."""
    try:
        yield
    except InvalidInputError as e:
        raise bad_request(str(e), e.param) from None


def body_number(body: dict, name: str, default=None, low=None, high=None, *, integer: bool = False,
                low_open: bool = False):
    """body[name] checked (options.check_number: a 400 naming it), or default when it is absent or null."""
    value = body.get(name)
    if value is None:
        return default
    with field_errors():
        return check_number(name, value, low, high, integer=integer, low_open=low_open)


class ClientGone(Exception):
    """The client closed its connection (or sent less than it announced): nothing more is answered."""


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


class RequestIO:
    """Request bodies and CORS for a BaseHTTPRequestHandler whose server has body_budget() and cors_origins."""

    def _read_body(self) -> dict:
        ctype = self.headers.get("Content-Type")
        if ctype is not None and ctype.split(";")[0].strip().lower() != "application/json":
            # a browser sends text/plain or form bodies cross-origin without a preflight: never process them
            raise RequestError(415, f"the request body must be application/json, not {ctype[:60]}",
                               code="unsupported_media_type")
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length = self.headers.get("Content-Length")
        if chunked and length is not None:
            raise bad_request("a request with both Transfer-Encoding: chunked and Content-Length is ambiguous")
        if chunked:
            raw = self._read_chunked()
        else:
            if length is None:
                raise RequestError(411, "a request body with Content-Length is required", code="length_required")
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                raise bad_request("invalid Content-Length") from None
            if n > MAX_BODY_BYTES:
                raise RequestError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="too_large")
            with self.server.body_budget(n):
                raw = self.rfile.read(n)
            if len(raw) < n:
                raise ClientGone()
        held = getattr(self, "_held", None)  # the server's ExitStack for this request (handler.Handler._dispatch)
        if held is not None:
            # the parsed body lives until the request ends, waiting for a slot or running: its cost is held as long
            held.enter_context(self.server.body_budget(len(raw) * getattr(self.server, "parsed_body_cost", 1)))
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except RecursionError:
            raise bad_request("the request body is nested too deeply", code="invalid_json") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", code="invalid_json")
        return body

    def _read_chunked(self) -> bytes:
        out = bytearray()
        with contextlib.ExitStack() as budget:
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise ClientGone()
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                    if size < 0:  # int() takes "-1": rfile.read(-1) would read without limit
                        raise ValueError
                except ValueError:
                    raise bad_request("malformed chunked request body") from None
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                if len(out) + size > MAX_BODY_BYTES:
                    raise RequestError(413, f"request body larger than {MAX_BODY_BYTES} bytes", code="too_large")
                budget.enter_context(self.server.body_budget(size))
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    raise ClientGone()
                out += chunk
                self.rfile.readline(1024)

    def _cors_origin(self) -> Optional[str]:
        """The request's Origin when the server allows it (None: no Origin, or one not allowed)."""
        origin = self.headers.get("Origin")
        allowed = self.server.cors_origins
        if origin and ("*" in allowed or origin in allowed):
            return origin
        return None

    def cors_headers(self) -> list:
        origin = self._cors_origin()
        if origin is None:
            return []
        return [("Access-Control-Allow-Origin", "*" if "*" in self.server.cors_origins else origin),
                ("Vary", "Origin")]

    _CORS_HEADERS = "Authorization, Content-Type"

    def _allowed_headers(self) -> str:
        """The headers the preflight asks for (clients such as openai's add their own x-... headers), when they
        are plain header names; else Authorization and Content-Type."""
        asked = self.headers.get("Access-Control-Request-Headers", "")
        if asked and len(asked) <= 1000 and all(c.isalnum() or c in "-_, " for c in asked):
            return asked
        return self._CORS_HEADERS

    def _preflight(self, route: str) -> None:
        """OPTIONS: a CORS preflight from an allowed origin gets 204 and the CORS grants; one from another origin
        403 (the browser then blocks the request); without an Origin, 204 and Allow. No API key is needed: a
        browser never sends one with a preflight."""
        if route in self._GET or route in self._POST or route.startswith("/models/"):
            allowed = ("GET" if route in self._GET or route.startswith("/models/") else "POST") + ", OPTIONS"
        else:
            return self._send_error(RequestError(404, f"unknown path {self.path}", code="not_found"))
        origin = self.headers.get("Origin")
        if origin and self._cors_origin() is None:
            return self._send_error(RequestError(
                403, f"origin {origin[:100]!r} is not allowed to call this server (lminf serve --cors-origin)",
                code="origin_not_allowed"))
        headers = [("Allow", allowed), ("Content-Length", "0")]
        if origin:
            headers += [("Access-Control-Allow-Methods", allowed),
                        ("Access-Control-Allow-Headers", self._allowed_headers()),
                        ("Access-Control-Max-Age", "600")]
        try:
            self.send_response(204)
            for k, v in self.cors_headers() + headers:
                self.send_header(k, v)
            self.end_headers()
        except DISCONNECTS:
            self.close_connection = True
