"""llama-server's own API where it maps onto ours: its request fields parsed into create_*completion keywords, and
our results shaped as its responses (POST /completion, GET /props, GET /slots, POST /slots/{id}?action=...,
GET /metrics, /tokenize with_pieces). handler.py routes the requests here; nothing here imports it.

Fields that have no meaning here are refused by name with the reason (n_keep: LM-Infinite keeps the first n_global
tokens as sinks, for every request; samplers: only an order this server applies), never dropped silently.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Optional

from . import grammar, inputs
from .httpio import RequestError, bad_request, body_number, field_errors, known_fields
from .options import LLAMA_CPP_PYTHON, MAX_LOGPROBS, SAMPLING, check_return_progress
from .responses import fallback_template

__all__ = ["EXTENSION_FIELDS", "CHAT_EXTENSION_FIELDS", "COMPLETION_FIELDS", "SAMPLERS", "extensions",
           "check_completion", "completion_shaper", "generation_settings", "props", "slots", "slot_action_args",
           "slot_action", "slot_file", "tokenize_args", "tokenize_reply", "serve_metrics", "Metrics"]

# llama-server's fields that the OpenAI routes (/v1/completions, /v1/chat/completions) accept too, as llama-server
# and vLLM do
EXTENSION_FIELDS = {"n_predict", "cache_prompt", "ignore_eos", "id_slot", "typical_p", "grammar", "json_schema",
                    "n_probs", "samplers", "n_keep"}
# llama-server's fields that /v1/chat/completions accepts too: return_progress (stream only), prompt_progress chunks
# while the prompt is read
CHAT_EXTENSION_FIELDS = {"return_progress"}
# POST /completion
COMPLETION_FIELDS = EXTENSION_FIELDS | {"prompt", "max_tokens", "temperature", "top_k", "top_p", "min_p",
                                        "repeat_penalty", "frequency_penalty", "presence_penalty", "seed", "stop",
                                        "stream", "logit_bias", "model"}
# llama-server's sampler names in the order this server applies them (generate.make_sampler). dry, top_n_sigma and
# xtc are no-ops here (their settings, dry_multiplier, top_n_sigma, xtc_probability, are refused as unknown fields,
# so they stay at llama-server's defaults, which turn them off)
SAMPLERS = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
_SAMPLER_ALIASES = {"typical_p": "typ_p", "typical": "typ_p", "temp": "temperature", "top-k": "top_k",
                    "top-p": "top_p", "min-p": "min_p", "typ-p": "typ_p", "typical-p": "typ_p"}
# a sampler left out of `samplers` is turned off: its settings take these values (a request that sets one of them
# otherwise is refused); without the temperature sampler the distribution is the model's own (temperature 1)
_OFF = {"penalties": {"repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0},
        "top_k": {"top_k": 0}, "typ_p": {"typical_p": 1.0}, "top_p": {"top_p": 1.0}, "min_p": {"min_p": 0.0},
        "temperature": {"temperature": 1.0}}
_N_KEEP = ("'n_keep' other than 0 is not supported: LM-Infinite keeps the first n_global tokens as sinks (lminf "
           "serve --n-global) and a window of n_local, for every request; nothing else is pinned")


def _given(body: dict, name: str) -> bool:
    return body.get(name) is not None


def extensions(body: dict, out: dict, *, chat: bool, max_tokens_limit: int) -> dict:
    """Apply llama-server's fields of body to out, the create_*completion keywords schema.py parsed from the
    OpenAI fields; out["id_slot"] (the slot asked for) is for the server, which takes it out. Returns out."""
    if _given(body, "n_predict"):  # llama-server's name of max_tokens; -1: until the end of generation
        n = body_number(body, "n_predict", None, -1, max_tokens_limit, integer=True)
        if n == 0:
            raise bad_request("'n_predict' must be -1 (until the end of generation, at most the window n_local) or "
                              ">= 1; 0 (evaluate the prompt only) is not supported", "n_predict")
        if _given(body, "max_tokens") and body["max_tokens"] != n:
            raise bad_request("'n_predict' and 'max_tokens' disagree", "n_predict")
        out["max_tokens"] = None if n == -1 else n
    for name in ("cache_prompt", "ignore_eos"):
        if _given(body, name) and not isinstance(body[name], bool):
            raise bad_request(f"'{name}' must be a boolean", name)
    # cache_prompt: accepted either way; a chat reuses the conversation its slot holds, a completion evaluates
    # its prompt afresh (it starts a new sequence)
    if body.get("ignore_eos"):
        out["ignore_eos"] = True
    if _given(body, "n_keep") and body_number(body, "n_keep", None, -1, integer=True) != 0:
        raise bad_request(_N_KEEP, "n_keep")
    if _given(body, "id_slot"):
        slot = body_number(body, "id_slot", None, -1, integer=True)
        if slot >= 0:
            out["id_slot"] = slot
    _grammar(body, out)
    if _given(body, "n_probs"):
        n = body_number(body, "n_probs", None, 0, MAX_LOGPROBS, integer=True)
        if chat and n:
            if out.get("top_logprobs", n) != n:
                raise bad_request("'n_probs' and 'top_logprobs' disagree", "n_probs")
            out.update(logprobs=True, top_logprobs=n)
        elif n:
            if out.get("logprobs", n) != n:
                raise bad_request("'n_probs' and 'logprobs' disagree", "n_probs")
            out["logprobs"] = n
    if _given(body, "samplers"):
        _samplers(body, out)
    if chat and _given(body, "return_progress"):
        with field_errors():
            if check_return_progress(body["return_progress"], out.get("stream")):
                out["return_progress"] = True
    return out


def _grammar(body: dict, out: dict) -> None:
    fmt = body.get("response_format")
    given = [k for k in ("grammar", "json_schema") if _given(body, k)] + \
        (["response_format"] if isinstance(fmt, dict) and fmt.get("type") not in (None, "text") else [])
    if len(given) > 1:
        raise bad_request(f"'{given[0]}' and '{given[1]}' both constrain the reply: give one", given[1])
    if _given(body, "grammar"):
        if not isinstance(body["grammar"], str):
            raise bad_request("'grammar' must be GBNF text (a string)", "grammar")
        if body["grammar"].strip():
            out["grammar"] = _checked(grammar.from_gbnf, body["grammar"], "grammar")
    elif _given(body, "json_schema"):
        if not isinstance(body["json_schema"], dict):
            raise bad_request("'json_schema' must be a JSON schema (an object)", "json_schema")
        out["grammar"] = _checked(grammar.from_schema, body["json_schema"], "json_schema")


def _checked(build, value, name: str):
    try:
        return build(value, name)
    except ValueError as e:  # InvalidInputError: over a bound, or a schema without a grammar
        raise bad_request(str(e), name) from None


def _samplers(body: dict, out: dict) -> None:
    names = body["samplers"]
    if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
        raise bad_request("'samplers' must be a list of sampler names (the string form is not supported)", "samplers")
    order = [_SAMPLER_ALIASES.get(s, s) for s in names]
    unknown = [s for s in order if s not in SAMPLERS]
    if unknown or len(set(order)) < len(order) or order != sorted(order, key=SAMPLERS.index):
        raise bad_request(f"'samplers': this server applies {', '.join(SAMPLERS)} in that order (dry, top_n_sigma and "
                          f"xtc as no-ops); a list of some of them in that order is accepted, not {names}"
                          + (f" ({unknown[0]!r} is not one of them)" if unknown else ""), "samplers")
    for sampler, settings in _OFF.items():
        if sampler in order:
            continue
        for name, off in settings.items():
            if _given(body, name) and body[name] != off:
                raise bad_request(f"'{name}' is set but 'samplers' leaves out {sampler}", "samplers")
            out[name] = off


def check_completion(body: dict) -> None:
    """POST /completion's own checks before the shared parse: its fields only (a 400 naming any other), and one
    prompt (a string or a list of token ids)."""
    known_fields(body, COMPLETION_FIELDS, "/completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
        raise bad_request("/completion takes one prompt: a string or a list of token ids (several prompts: "
                          "/v1/completions)", "prompt")


def generation_settings(kwargs: dict) -> dict:
    """llama-server's generation_settings (also /props' defaults) for create_completion keywords."""
    g = kwargs.get("grammar")
    return {"n_predict": kwargs.get("max_tokens") or -1,
            "seed": kwargs.get("seed") if kwargs.get("seed") is not None else 0xFFFFFFFF,
            "temperature": kwargs.get("temperature", SAMPLING.temperature),
            "top_k": kwargs.get("top_k", SAMPLING.top_k), "top_p": kwargs.get("top_p", SAMPLING.top_p),
            "min_p": kwargs.get("min_p", SAMPLING.min_p), "typical_p": kwargs.get("typical_p", SAMPLING.typical_p),
            "repeat_last_n": 64, "repeat_penalty": kwargs.get("repeat_penalty", SAMPLING.repeat_penalty),
            "presence_penalty": kwargs.get("presence_penalty", SAMPLING.presence_penalty),
            "frequency_penalty": kwargs.get("frequency_penalty", SAMPLING.frequency_penalty),
            "stop": list(kwargs.get("stop") or []), "n_keep": 0, "n_probs": kwargs.get("logprobs") or 0,
            "ignore_eos": bool(kwargs.get("ignore_eos")), "stream": bool(kwargs.get("stream")),
            "grammar": getattr(g, "_grammar", "") if g is not None else "",
            "samplers": [s for s in SAMPLERS if s not in ("dry", "top_n_sigma", "xtc")]}


# -- POST /completion: our create_completion's result in llama-server's shape -------------------------------------

def _probabilities(logprobs: Optional[dict]) -> list:
    """OpenAI completion logprobs as llama-server's completion_probabilities (token text and bytes, logprob, the
    top alternatives; no token ids: the OpenAI shape this is made from has none)."""
    if not logprobs:
        return []
    return [{"token": t, "bytes": list(t.encode("utf-8")), "logprob": lp,
             "top_logprobs": [{"token": k, "bytes": list(k.encode("utf-8")), "logprob": v}
                              for k, v in (top or {}).items()]}
            for t, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"])]


def _timings(before: dict, after: dict) -> dict:
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    out = {}
    for name, n, s in (("prompt", "prompt_tokens", "prompt_seconds"),
                       ("predicted", "predicted_tokens", "predicted_seconds")):
        count, ms = d.get(n, 0), d.get(s, 0.0) * 1000.0
        out.update({f"{name}_n": count, f"{name}_ms": ms, f"{name}_per_token_ms": ms / count if count else 0.0,
                    f"{name}_per_second": 1000.0 * count / ms if ms else 0.0})
    return out


def _stop_type(choice: dict) -> tuple:
    finish = choice.get("finish_reason")
    if finish == "length":
        return "limit", ""
    if finish == "stop":
        word = choice.get("stop_reason")
        return ("word", word) if word else ("eos", "")
    return "none", ""


def completion_shaper(server, kwargs: dict, prompt):
    """For Handler._run (handler.py): shape(llm), called with the slot held before generating, returns
    reshape(out), which turns create_completion's result (or its stream of chunks) into llama-server's /completion
    response (or its stream: {"content", "stop": false, ...} per piece, then the whole result with "content": ""
    and "stop": true)."""
    def shape(llm):
        before = dict(getattr(llm, "totals", None) or {})
        slot = server.pool.sessions.index(llm)
        shown = prompt if isinstance(prompt, str) else llm.detokenize(prompt)

        def final(choice: dict, usage: dict, content: str) -> dict:
            stop_type, word = _stop_type(choice)
            out = {"index": 0, "content": content, "tokens": [], "id_slot": slot, "stop": True,
                   "model": server.model_id, "tokens_predicted": usage.get("completion_tokens", 0),
                   "tokens_evaluated": usage.get("prompt_tokens", 0),
                   "generation_settings": generation_settings(kwargs), "prompt": shown,
                   "has_new_line": "\n" in content, "truncated": False, "stop_type": stop_type,
                   "stopping_word": word, "timings": _timings(before, dict(getattr(llm, "totals", None) or {}))}
            if kwargs.get("logprobs") is not None and not kwargs.get("stream"):
                out["completion_probabilities"] = _probabilities(choice.get("logprobs"))
            return out

        def chunks(stream):
            last: dict = {}
            for chunk in stream:
                if not chunk.get("choices"):  # the usage chunk ends the stream (include_usage)
                    yield final(last, chunk.get("usage") or {}, "")
                    return
                choice = chunk["choices"][0]
                if choice.get("finish_reason") is not None:
                    last = choice
                if choice.get("text"):
                    piece = {"index": 0, "content": choice["text"], "tokens": [], "stop": False, "id_slot": slot}
                    if kwargs.get("logprobs") is not None:
                        piece["completion_probabilities"] = _probabilities(choice.get("logprobs"))
                    yield piece

        def reshape(out):
            if isinstance(out, dict):
                choice = out["choices"][0]
                return final(choice, out.get("usage") or {}, choice["text"])
            return chunks(out)
        return reshape
    return shape


# -- GET /props, GET /slots ---------------------------------------------------------------------------------------

def _lminf(llm) -> dict:
    return {"mode": llm.mode, "n_global": llm.n_global, "n_local": llm.n_local,
            "dist_max": getattr(llm, "dist_max", None)}


def props(server) -> dict:
    """llama-server's /props: default generation settings, slots, model path, chat template, build; plus "lminf":
    the attention mode and its G, L, C."""
    llm = server.llm
    from . import __version__  # the package's version (its __init__ imports the engine, not this module)
    template = llm.metadata.get("tokenizer.chat_template") if hasattr(llm, "metadata") else None
    if not template and hasattr(llm, "metadata"):
        template = fallback_template(llm)[1]
    defaults = generation_settings({"max_tokens": None})
    return {"default_generation_settings": {"n_ctx": getattr(llm, "n_local", None), "params": defaults},
            "total_slots": len(server.pool), "model_path": getattr(llm, "model_path", None),
            "model_alias": server.model_id, "chat_template": template or "",
            "build_info": f"lminf_gguf {__version__} (llama-cpp-python {LLAMA_CPP_PYTHON}, patched llama.cpp)",
            "modalities": {"vision": False, "audio": False},
            "lminf": _lminf(llm) if hasattr(llm, "mode") else {}}


def slots(server) -> list:
    """llama-server's /slots: per slot its id, whether it is processing, n_ctx (the window n_local), and "lminf":
    the cache figures seen when its last request ended (tokens of the stream, cells used and allocated,
    rebases)."""
    busy = server.metrics.processing()
    out = []
    for i, llm in enumerate(server.pool.sessions):
        out.append({"id": i, "is_processing": i in busy, "n_ctx": getattr(llm, "n_local", None),
                    "lminf": dict(_lminf(llm) if hasattr(llm, "mode") else {}, **server.metrics.cache(i))})
    return out


# -- POST /slots/{id}?action=save|restore|erase -------------------------------------------------------------------

_ACTIONS = ("save", "restore", "erase")


def slot_action_args(path: str, route: str, save_path: Optional[str]) -> tuple:
    """(slot id, action) of POST /slots/{id}?action=...; 501 without --slot-save-path (as llama-server)."""
    if not save_path:
        raise RequestError(501, "this server does not support slot actions (start it with --slot-save-path DIR)",
                           code="not_supported", type_="not_supported_error")
    ident = route[len("/slots/"):]
    if not (ident.isascii() and ident.isdigit() and len(ident) < 6):
        raise bad_request(f"invalid slot id {ident[:20]!r}", "id_slot")
    query = path.split("?", 1)[1] if "?" in path else ""
    params = dict(p.partition("=")[::2] for p in query.split("&") if p)
    action = params.get("action")
    if action not in _ACTIONS:
        raise bad_request(f"invalid action {str(action)[:20]!r}: one of {', '.join(_ACTIONS)} (?action=...)", "action")
    return int(ident), action


def slot_file(save_path: str, body: dict) -> str:
    """The file a save or restore names ({"filename"}): a plain name inside --slot-save-path, never a path."""
    unknown = sorted(k for k in body if k != "filename")
    if unknown:
        raise bad_request(f"unsupported field {unknown[0]!r}; slot save and restore take 'filename'", unknown[0])
    name = body.get("filename")
    if not isinstance(name, str) or not name:
        raise bad_request("'filename' must be a non-empty string", "filename")
    if (len(name.encode("utf-8", "surrogatepass")) > 255 or name in (".", "..") or ".." in name
            or any(c in name for c in "/\\:") or any(ord(c) < 32 or ord(c) == 127 for c in name)
            or os.path.isabs(name) or name != name.strip()):
        raise bad_request(f"invalid filename {name[:60]!r}: a plain file name inside the slot save directory (no path "
                          "separators, '..', control characters or NUL, at most 255 bytes)", "filename")
    return os.path.join(save_path, name)


def slot_action(llm, slot: int, action: str, body: dict, save_path: str) -> dict:
    """Save the slot's sequence to a state file, restore one (a refused file leaves the slot as it was), or erase
    it (a fresh sequence); llama-server's response shapes. StateError (a 400) for a file that is refused."""
    started = time.perf_counter()
    if action == "erase":
        n = llm.cache_info()["n_tokens"]
        llm.reset()
        return {"id_slot": slot, "n_erased": n}
    path = slot_file(save_path, body)
    if action == "save":
        size = llm.save_state(path)
        ms = (time.perf_counter() - started) * 1000.0
        return {"id_slot": slot, "filename": body["filename"], "n_saved": llm.cache_info()["n_tokens"],
                "n_written": size, "timings": {"save_ms": ms}}
    if not os.path.isfile(path):
        raise bad_request(f"no slot file {body['filename']!r} in the slot save directory", "filename")
    size = os.path.getsize(path)
    llm.load_state(path)
    ms = (time.perf_counter() - started) * 1000.0
    return {"id_slot": slot, "filename": body["filename"], "n_restored": llm.cache_info()["n_tokens"],
            "n_read": size, "timings": {"restore_ms": ms}}


# -- /tokenize ----------------------------------------------------------------------------------------------------

TOKENIZE_FIELDS = {"content", "add_special", "parse_special", "with_pieces"}


def tokenize_args(body: dict) -> tuple:
    """(text, add_special, parse_special, with_pieces) of a /tokenize body (a 400 naming any other field)."""
    unknown = sorted(k for k in body if k not in TOKENIZE_FIELDS)
    if unknown:
        raise bad_request(f"unsupported field {unknown[0]!r}; /tokenize implements: "
                          + ", ".join(sorted(TOKENIZE_FIELDS)), unknown[0])
    text = body.get("content")
    if not isinstance(text, str):
        raise bad_request("'content' must be a string", "content")
    flags = []
    for name in ("add_special", "parse_special", "with_pieces"):
        value = body.get(name, False)
        if not isinstance(value, bool):
            raise bad_request(f"'{name}' must be a boolean", name)
        flags.append(value)
    return (text, *flags)


def tokenize_reply(llm, tokens: list, with_pieces: bool) -> dict:
    """{"tokens": [ids]}, or with_pieces {"tokens": [{"id", "piece"}]}: the piece as text, or as a list of bytes
    when it is not valid UTF-8 on its own (part of a character), as llama-server gives it."""
    if not with_pieces:
        return {"tokens": tokens}
    out = []
    for tok in tokens:
        raw = inputs.piece(llm, tok)
        try:
            piece = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)
        out.append({"id": tok, "piece": piece})
    return {"tokens": out}


# -- GET /metrics -------------------------------------------------------------------------------------------------

def serve_metrics(handler) -> None:
    """GET /metrics: Prometheus text (llama-server's names where they map); 501 unless started with --metrics."""
    s = handler.server
    if not s.metrics_enabled:
        raise RequestError(501, "this server does not support metrics (start it with --metrics)",
                           code="not_supported", type_="not_supported_error")
    data = s.metrics.text(len(s.pool), s.waiting()).encode()
    handler.send_response(200)
    for k, v in [("Content-Type", "text/plain; version=0.0.4"), ("Content-Length", str(len(data)))] + \
            handler.cors_headers():
        handler.send_header(k, v)
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)


_COUNTERS = (  # (llama-server's name, help, the session total it sums)
    ("prompt_tokens_total", "Number of prompt tokens processed.", "prompt_tokens"),
    ("prompt_seconds_total", "Prompt process time.", "prompt_seconds"),
    ("tokens_predicted_total", "Number of generation tokens processed.", "predicted_tokens"),
    ("tokens_predicted_seconds_total", "Predict process time.", "predicted_seconds"),
    ("n_decode_total", "Total number of llama_decode() calls.", "decodes"),
)


class Metrics:
    """The server's counters (thread-safe): the generation totals of the sessions (generate.tally) summed over the
    requests, requests served, rebases, and per slot whether it is processing and its cache when it was last
    released. LMInfServer.session calls begin and end around each request, with the slot held."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sums = {key: 0 for _, _, key in _COUNTERS}
        self._sums.update(requests=0, rebases=0)
        self._busy: set = set()
        self._cache: dict = {}

    @staticmethod
    def _read(llm) -> tuple:
        info = None
        if hasattr(llm, "cache_info"):
            try:
                info = llm.cache_info()
            except Exception:  # noqa: BLE001 (a closed or busy session: no figures this time)
                info = None
        return dict(getattr(llm, "totals", None) or {}), info

    def begin(self, slot: int, llm) -> tuple:
        with self._lock:
            self._busy.add(slot)
        return self._read(llm)

    def end(self, slot: int, llm, started: tuple) -> None:
        totals, info = self._read(llm)
        with self._lock:
            self._busy.discard(slot)
            self._sums["requests"] += 1
            for key in totals:
                if key in self._sums:
                    self._sums[key] += totals[key] - started[0].get(key, 0)
            if info is not None:
                before = started[1]["rebases"] if started[1] is not None else 0
                self._sums["rebases"] += info["rebases"] - before if info["rebases"] >= before else info["rebases"]
                self._cache[slot] = {k: info[k] for k in ("n_tokens", "cells_used", "cells_total", "rebases",
                                                          "store_rows", "store_bytes") if k in info}

    def processing(self) -> set:
        with self._lock:
            return set(self._busy)

    def cache(self, slot: int) -> dict:
        with self._lock:
            return dict(self._cache.get(slot, {}))

    def text(self, n_slots: int, deferred: int) -> str:
        """Prometheus text format (version 0.0.4), llama-server's metric names (llamacpp:...) where they map, ours
        (lminf:...) for the rest."""
        with self._lock:
            sums, busy, cache = dict(self._sums), len(self._busy), dict(self._cache)
        used = sum(c["cells_used"] for c in cache.values())
        total = sum(c["cells_total"] for c in cache.values())
        rows = [(f"llamacpp:{name}", "counter", text, sums[key]) for name, text, key in _COUNTERS]
        rows += [("llamacpp:kv_cache_usage_ratio", "gauge", "KV-cache usage (cells used / allocated, at the "
                  "slots' last requests).", used / total if total else 0.0),
                 ("llamacpp:kv_cache_tokens", "gauge", "KV-cache cells in use (at the slots' last requests).", used),
                 ("llamacpp:requests_processing", "gauge", "Number of requests processing.", busy),
                 ("llamacpp:requests_deferred", "gauge", "Number of requests waiting for a slot.", deferred),
                 ("lminf:requests_total", "counter", "Requests that held a slot.", sums["requests"]),
                 ("lminf:rebases_total", "counter", "Window moves (rebases) of the LM-Infinite caches.",
                  sums["rebases"]),
                 ("lminf:slots_total", "gauge", "Slots.", n_slots)]
        out = []
        for name, kind, text, value in rows:
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"
