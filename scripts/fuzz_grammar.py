#!/usr/bin/env python3
"""Fuzz the grammar path of `lminf serve`: N chat requests whose JSON schemas are hostile, against a real server
process (the offline default model, whose vocabulary renders the chat template), as response_format and as tool parameters.

    python scripts/fuzz_grammar.py 2000 [--seed 1] [--json results/fuzz_grammar.json]

Each schema is built from random parts: regex patterns with every repeat syntax the converter reads ({N}, {N,},
{,M}, {N,M}, underscores, non-ASCII digits, huge and nested counts, unbalanced braces), count keywords (small,
huge, negative, fractional, NaN-like strings), deep nesting of objects, arrays and anyOf, large enums, $ref to
definitions (recursive, missing, remote), formats and numeric bounds with huge exponents. Half go out as
response_format json_schema, half as a tool's parameters with tool_choice naming it (a 400 until the server takes
tools is a clean refusal too). Outcomes: "2xx" (accepted: a grammar was built and the reply generated), "4xx" (a
clean refusal), "5xx", "closed" (no answer), "slow" (over --slow seconds), "hang" (no answer in --timeout), "crash" (the server died; it
is restarted). Failures: 5xx, closed, slow, hang, crash, and a server peak RSS over --max-rss-mb. Exit code 1 on any.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("fuzz_server", ROOT / "fuzz_server.py")
fuzz_server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_server)

FAILURES = ("5xx", "slow", "hang", "crash", "closed")
_DIGITS = ["5", "50", "1000", "1001", "1000000", "1_000", "1_000_000_000", "\uff15\uff10", "\u0665\u0660",
           "99999999999999999999", "0", "", " 3 ", "-1", "1e3", "0x10"]


def _repeat(rng: random.Random) -> str:
    a, b = rng.choice(_DIGITS), rng.choice(_DIGITS)
    return rng.choice(["{%s}" % a, "{%s,}" % a, "{,%s}" % b, "{%s,%s}" % (a, b), "*", "+", "?", "{", "{%s" % a])


def _pattern(rng: random.Random, depth: int = 0) -> str:
    parts = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        if kind == 0 and depth < 4:
            item = "(" + _pattern(rng, depth + 1) + ")"
        elif kind == 1:
            item = rng.choice(["[a-z]", "[^x]", "\\d", "\\w", ".", "[{]", "\\{"])
        elif kind == 2 and depth < 3:
            item = "(" + "|".join(_pattern(rng, depth + 1) for _ in range(rng.randint(2, 3))) + ")"
        else:
            item = rng.choice(["a", "ab", "\u00e9", "\\u0041", "x"])
        if rng.random() < 0.7:
            item += _repeat(rng)
        parts.append(item)
    return ("^" if rng.random() < 0.5 else "") + "".join(parts) + ("$" if rng.random() < 0.5 else "")


def _count(rng: random.Random):
    return rng.choice([0, 1, 3, 20, 1000, 1001, 5000, 10 ** 6, 10 ** 9, -1, 2.5, 1e308, "7", None, True])


def schema(rng: random.Random, depth: int = 0):
    kind = rng.randrange(10 if depth < 12 else 4)
    if kind == 0:
        s = {"type": "string"}
        for key in ("minLength", "maxLength"):
            if rng.random() < 0.5:
                s[key] = _count(rng)
        if rng.random() < 0.7:
            s["pattern"] = _pattern(rng)
        if rng.random() < 0.2:
            s["format"] = rng.choice(["date", "date-time", "uuid", "time", "email", "nonsense"])
        return s
    if kind == 1:
        return {"type": rng.choice(["integer", "number"]),
                **{k: rng.choice([0, -5, 10 ** 18, -1e308, 1e308, 0.5, 2 ** 63])
                   for k in ("minimum", "maximum", "exclusiveMinimum") if rng.random() < 0.5}}
    if kind == 2:
        return {"enum": [rng.choice(["a", 1, None, {"x": 1}, "\u0000", "b" * 50]) for _ in range(
            rng.choice([0, 1, 5, 200, 3000]))]}
    if kind == 3:
        return rng.choice([{"type": "boolean"}, {"const": "x"}, {"type": "null"}, {}, {"type": "nonsense"},
                           {"$ref": "#/definitions/missing"}, {"$ref": "https://example.com/s.json"}])
    if kind in (4, 5):
        props = {f"p{i}": schema(rng, depth + 1) for i in range(rng.randint(0, 4))}
        s = {"type": "object", "properties": props}
        if props and rng.random() < 0.6:
            s["required"] = rng.sample(sorted(props), rng.randint(1, len(props)))
        for key in ("minProperties", "maxProperties"):
            if rng.random() < 0.2:
                s[key] = _count(rng)
        if rng.random() < 0.3:
            s["additionalProperties"] = rng.choice([True, False, {"type": "string"}])
        return s
    if kind == 6:
        s = {"type": "array", "items": schema(rng, depth + 1)}
        for key in ("minItems", "maxItems"):
            if rng.random() < 0.5:
                s[key] = _count(rng)
        return s
    if kind == 7:
        return {rng.choice(["anyOf", "oneOf", "allOf"]): [schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    if kind == 8:   # definitions and references, recursive ones included
        return {"definitions": {"node": {"type": "object", "properties": {
                    "next": {"$ref": "#/definitions/node"}, "v": schema(rng, depth + 1)}}},
                "$ref": rng.choice(["#/definitions/node", "#/definitions/none", "#", "#/definitions"])}
    # nesting far past any bound: a chain of arrays (as text: json.dumps itself stops near 1000 levels)
    return _Deep(rng.choice([10, 70, 500, 5000]))


class _Deep(str):
    """A chain of n arrays around a string schema, spliced into the request's JSON text by make_request."""

    def __new__(cls, n: int):
        obj = super().__new__(cls, "@deep@")
        obj.text = '{"type": "array", "items": ' * n + '{"type": "string"}' + "}" * n
        return obj


def make_request(rng: random.Random):
    s = schema(rng)
    messages = [{"role": "user", "content": "x"}]
    if rng.random() < 0.5:
        body = {"messages": messages, "max_tokens": 4,
                "response_format": {"type": "json_schema", "json_schema": {"name": "f", "schema": s}}}
        where = "response_format"
    else:
        params = s if rng.random() < 0.5 else {"type": "object", "properties": {"a": s}}
        body = {"messages": messages, "max_tokens": 4,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": params}}],
                "tool_choice": {"type": "function", "function": {"name": "f"}}}
        where = "tools"
    text = json.dumps(body)
    if isinstance(s, _Deep):
        text = text.replace('"@deep@"', s.text, 1)
    return f"{where} {(s.text if isinstance(s, _Deep) else json.dumps(s))[:160]}", post(text)


def post(text: str, path: str = "/v1/chat/completions") -> bytes:
    """A whole HTTP request posting JSON text."""
    data = text.encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    return head.encode() + data


def request(port: int, data: bytes, timeout: float):
    """(HTTP status, JSON body or None) of one raw request; status "hang" or "closed" when no answer comes.
    Unlike fuzz_server.send, the connection stays open while the answer is read: the server reads a half-closed
    connection as a client gone and drops a request it is generating for (by design)."""
    import socket
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got, deadline = b"", time.time() + timeout
    try:
        sock.sendall(data)
        while time.time() < deadline:
            try:
                part = sock.recv(65536)
            except socket.timeout:
                return "hang", None
            except ConnectionResetError:
                break
            if not part:
                break
            got += part
        else:
            return "hang", None
    finally:
        sock.close()
    if not got:
        return "closed", None
    head, _, body = got.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 500, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def send(port: int, data: bytes, timeout: float) -> str:
    status, _ = request(port, data, timeout)
    return status if isinstance(status, str) else f"{status // 100}xx"


def default_model() -> str:
    import lminf_gguf
    return lminf_gguf.default_model_path()


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process (its peak resident set), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(n: int, seed: int, timeout: float = 30.0, slow: float = 10.0, log=print, model=None):
    """[(name, outcome, seconds)] for n requests, and the server's peak RSS in MB (the largest over restarts)."""
    rng = random.Random(seed)
    results, peak = [], 0.0
    server = fuzz_server.Server(model or default_model())
    try:
        for _ in range(n):
            name, data = make_request(rng)
            t0 = time.time()
            outcome = send(server.port, data, timeout)
            seconds = time.time() - t0
            if not server.alive():
                outcome = "crash"
                log(f"crash on {name}: {server.proc.stderr.read()[-800:]}")
                server.start()
            else:
                peak = max(peak, peak_rss_mb(server.proc.pid))
                if outcome not in FAILURES and seconds > slow:
                    outcome = "slow"
            results.append((name, outcome, seconds))
    finally:
        server.stop()
    return results, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, nargs="?", default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds without an answer that make a hang")
    ap.add_argument("--slow", type=float, default=10.0, help="seconds over which an answer is a failure")
    ap.add_argument("--max-rss-mb", type=float, default=1024.0)
    ap.add_argument("--model", help="a GGUF model to serve (default: the offline default model)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t0 = time.time()
    results, peak = run(args.n, args.seed, args.timeout, args.slow, log=lambda s: print(s, file=sys.stderr),
                        model=args.model)
    counts = Counter(o for _, o, _ in results)
    longest = max((s for _, _, s in results), default=0.0)
    print(f"{len(results)} requests in {time.time() - t0:.0f} s: " +
          ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) +
          f"; longest {longest:.2f} s; server peak RSS {peak:.0f} MB")
    bad = [(name, o) for name, o, _ in results if o in FAILURES]
    for name, o in bad[:20]:
        print(f"FAIL {o}: {name}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"counts": counts, "peak_rss_mb": peak, "longest_s": longest,
                                               "results": results}, indent=1))
    return 1 if bad or peak > args.max_rss_mb else 0


if __name__ == "__main__":
    sys.exit(main())
