"""The chat page at GET / of `lminf serve` (webui.html, package data; off with --no-webui).

The page is one self-contained file: inline CSS and JavaScript, nothing loaded from the network (the machine may
be offline), and a Content-Security-Policy that forbids any external load. It keeps the conversation in the
browser (localStorage) and sends it whole with each turn to POST /v1/chat/completions with "stream": true; the
server evaluates only the new messages of a conversation its slot already holds, and with "return_progress"
streams the progress of the prompt's evaluation (a long attached file) before the reply. Several conversations
are kept, one localStorage key each; text files are read in the browser (FileReader) and go into the next user
message as "File NAME:\n\n<text>". GET /webui/info tells it the LM-Infinite window it talks to and the largest
request the server takes (max_body_bytes); GET /slots (llama_api.py) the caches' figures, after each reply."""

from __future__ import annotations

import functools
from importlib import resources

from .httpio import DISCONNECTS, MAX_BODY_BYTES, RequestError
from .options import MODES

__all__ = ["PAGE_HEADERS", "ROUTES", "page", "info", "max_body_bytes", "serve_page", "serve_info"]

# the paths of the page (served without an API key: a browser cannot send one when it opens an address; the page
# then asks for the key and sends it with its API calls)
ROUTES = ("/", "/index.html")

# no external script, style, font, image, frame or connection: the page talks to this server only
CSP = ("default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'none'; object-src 'none'; frame-src 'none'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
PAGE_HEADERS = (("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-cache"),
                ("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff"),
                ("Referrer-Policy", "no-referrer"))


@functools.lru_cache(maxsize=1)
def page() -> bytes:
    """The page's bytes (webui.html in the installed package)."""
    return resources.files(__package__).joinpath("webui.html").read_bytes()


def max_body_bytes(server) -> int:
    """The largest request body the server takes: MAX_BODY_BYTES (413 past it), or less when its memory budget
    (--memory-budget-mb) cannot hold one parsed body of that size (parsed_body_cost times its bytes; 503 then)."""
    from .handler import MAX_BODIES_BYTES  # handler.py imports this module

    budget = server.memory_budget if getattr(server, "memory_budget", None) is not None else MAX_BODIES_BYTES
    return min(MAX_BODY_BYTES, budget // max(1, getattr(server, "parsed_body_cost", 1)))


def info(server) -> dict:
    """What the page shows about the server: the model id, LM-Infinite's mode and window, the slots, the largest
    request it takes (an attached file goes whole into the conversation, which goes whole with each turn)."""
    llm = server.llm
    mode = getattr(llm, "mode", None)
    out = {"model": server.model_id, "mode": mode, "n_global": getattr(llm, "n_global", None),
           "n_local": getattr(llm, "n_local", None), "slots": len(server.pool),
           "max_tokens_limit": server.max_tokens_limit, "api_key_required": server.api_key is not None,
           "max_body_bytes": max_body_bytes(server)}
    if mode in MODES:
        out["mode_help"] = MODES[mode].help
        out["bounded"] = MODES[mode].bounded  # sinks + window: a conversation of any length in bounded memory
        if MODES[mode].topk:
            out["topk"] = getattr(llm, "topk", None)
    return out


def _check(handler) -> None:
    if not getattr(handler.server, "webui", True):
        raise RequestError(404, f"unknown path {handler.path}", code="not_found")


def serve_page(handler) -> None:
    """GET / and /index.html: the page (404 as any unknown path when the server runs with --no-webui)."""
    _check(handler)
    data = page()
    try:
        handler.send_response(200)
        for k, v in PAGE_HEADERS + (("Content-Length", str(len(data))),) + tuple(handler.cors_headers()):
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)
    except DISCONNECTS:
        handler.close_connection = True


def serve_info(handler) -> None:
    """GET /webui/info: info() as JSON (the API key is needed as on the other API routes)."""
    _check(handler)
    handler.send_json(200, info(handler.server))
