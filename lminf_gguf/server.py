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
read so far, cache included: processed == total at the end; the chat page's progress bar); model and user are
accepted and ignored, and any other field is refused with a 400 that names it (README's table). The fields and
their checks are in schema.py (the sampling settings and n, stream_options, logprobs: options.py, as the Python
API checks them), the HTTP handler in handler.py; this module is the command, `lminf serve`.
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
import os
import signal
import sys
import threading

from .handler import MAX_BODIES_BYTES, MAX_QUEUE, PARSED_BODY_COST, LMInfServer, make_server
from .httpio import MAX_BODY_BYTES
from .options import add_model_flags, default_threads, engine_kwargs, ignored_options
from .schema import MAX_TOKENS_LIMIT, parse_chat_request, parse_completion_request
from .slots import SlotPool, open_sessions

# the command is here; the request schema in schema.py, the HTTP handler in handler.py (re-exported: the server's
# Python API, as before the split)
__all__ = ["LMInfServer", "make_server", "add_parser", "cmd_serve", "parse_completion_request", "parse_chat_request",
           "MAX_BODY_BYTES", "MAX_BODIES_BYTES", "MAX_QUEUE", "MAX_TOKENS_LIMIT", "PARSED_BODY_COST"]


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
