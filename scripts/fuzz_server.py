#!/usr/bin/env python3
"""Fuzz `lminf serve`: N malformed or hostile requests against a real server process (a tiny model).

    python scripts/fuzz_server.py 2000 [--seed 1] [--json results/fuzz_server.json]

Each request is built from random parts: method, path, framing (Content-Length right, missing, negative, huge,
not a number, disagreeing with the body; chunked bodies with odd or negative chunk sizes; both at once), content
type, and a body (a valid request with fields of the wrong type or size, deep nesting, huge numbers, NaN, random
bytes). The request is sent whole and the sending side closed; the answer must come within --timeout seconds.
Outcomes: "2xx", "4xx" (the client's mistake, as documented), "501" (a method HTTP does not define), "closed"
(the server closed without an answer: a body that ended early), "5xx" (a server error: a failure), "hang" (no answer: a failure), "crash" (the server
process died: a failure; it is restarted). /health is checked every 50 requests. Exit code 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAILURES = ("5xx", "hang", "crash")

SERVER = """
import sys
import lminf_gguf
from lminf_gguf.server import make_server
llm = lminf_gguf.LMInfinite(sys.argv[1], n_local=16, n_batch=8, n_threads=1)
srv = make_server(llm, "127.0.0.1", 0, max_tokens_limit=32)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"""


def _odd(rng: random.Random, depth: int = 0):
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**63), 10**30])
    if kind == 1:
        return rng.choice([0.0, -0.5, 1e308, 1e-308, 3.5])
    if kind == 2:
        return rng.choice(["", "a", "x" * 5000, "<|im_end|>", "\u0000", "\ud7ff"])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4 and depth < 3:
        return [_odd(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 5 and depth < 3:
        return {rng.choice(["role", "content", "a", ""]): _odd(rng, depth + 1) for _ in range(rng.randrange(3))}
    return rng.choice(["hi", 3, [], {}])


def _body(rng: random.Random, chat: bool) -> bytes:
    kind = rng.randrange(10)
    if kind == 0:
        return os.urandom(rng.choice([0, 1, 10, 1000]))
    if kind == 1:
        depth = rng.choice([10, 1000, 100000])
        return b"[" * depth + b"]" * depth
    if kind == 2:
        return rng.choice([b"{", b"null", b"[]", b'{"prompt": NaN}', b'{"prompt": "a", "max_tokens": 1' + b"0" * 400
                           + b"}", b'{"prompt": "a"} trailing', b"\xef\xbb\xbf{}"])
    req = ({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hello"})
    req.update(max_tokens=rng.choice([1, 4, 8]), temperature=0)
    for _ in range(rng.randrange(4)):
        key = rng.choice(["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop",
                          "stream", "seed", "n", "logprobs", "echo", "repeat_penalty", "model", "user",
                          "frequency_penalty", "response_format", "tools"])
        req[key] = _odd(rng)
    if rng.random() < 0.2:
        req["stream"] = True
    return json.dumps(req).encode()


def make_request(rng: random.Random) -> tuple[str, bytes]:
    path = rng.choice(["/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/v1/x", "/",
                       "/v1/completions?x=1", "/" + "a" * 5000])
    method = rng.choices(["POST", "GET", "HEAD", "OPTIONS", "PUT", "DELETE", "BREW", "post"],
                         weights=[12, 2, 1, 1, 1, 1, 1, 1])[0]
    body = _body(rng, chat="chat" in path)
    headers = [("Host", "x")]
    ctype = rng.choices(["application/json", "application/json; charset=utf-8", "text/plain", None,
                         "multipart/form-data"], weights=[10, 2, 1, 2, 1])[0]
    if ctype:
        headers.append(("Content-Type", ctype))
    framing = rng.choices(["length", "none", "negative", "huge", "garbage", "short", "long", "chunked",
                           "chunked-odd", "both"], weights=[10, 1, 1, 1, 1, 1, 1, 2, 2, 1])[0]
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "negative":
        headers.append(("Content-Length", "-5"))
    elif framing == "huge":
        headers.append(("Content-Length", str(rng.choice([2**31, 2**63, 10**30]))))
    elif framing == "garbage":
        headers.append(("Content-Length", rng.choice(["abc", "1e3", "", " 12 ", "0x10"])))
    elif framing == "short":
        headers.append(("Content-Length", str(len(body) + rng.randrange(1, 100))))
    elif framing == "long":
        headers.append(("Content-Length", str(max(0, len(body) - rng.randrange(1, 5)))))
    elif framing in ("chunked", "chunked-odd", "both"):
        headers.append(("Transfer-Encoding", "chunked"))
        if framing == "both":
            headers.append(("Content-Length", str(len(body))))
        out, pos = b"", 0
        while pos < len(body):
            n = rng.randrange(1, 64)
            out += f"{n:x}\r\n".encode() + body[pos:pos + n] + b"\r\n"
            pos += n
        if framing == "chunked-odd":
            out = rng.choice([b"-1\r\n", b"zz\r\n", b"fffffffffff\r\n", b"5;ext=1\r\nhello\r\n"]) + out
        body = out + b"0\r\n\r\n"
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return f"{method} {path[:40]} {framing} {ctype}", head.encode() + body


class Server:
    def __init__(self, model: str):
        self.model = model
        self.start()

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, self.model], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(),
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.port = int(self.proc.stdout.readline())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def send(port: int, data: bytes, timeout: float) -> str:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before it has read everything
        got = b""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                part = sock.recv(65536)
            except socket.timeout:
                return "hang"
            except ConnectionResetError:
                break
            if not part:
                break
            got += part
        else:
            return "hang"
    finally:
        sock.close()
    if not got:
        return "closed"
    try:
        status = int(got.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return "5xx"
    if status == 501:
        return "501"  # a method HTTP knows nothing of (BREW, lower-case post): Not Implemented, as RFC 9110 says
    return f"{status // 100}xx"


def health(port: int) -> bool:
    return send(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 10) == "2xx"


def run(n: int, seed: int, timeout: float, log=print, model=None):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import write_tiny_llama

    rng = random.Random(seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="fuzz_server_") as root:
        model = model or write_tiny_llama(os.path.join(root, "model.gguf"), seed=seed + 1)
        server = Server(model)
        try:
            for i in range(n):
                name, data = make_request(rng)
                outcome = send(server.port, data, timeout)
                if not server.alive():
                    outcome = "crash"
                    log(f"crash on {name}: {server.proc.stderr.read()[-800:]}")
                    server.start()
                elif i % 50 == 49 and not health(server.port):
                    outcome = "hang"
                    log(f"unhealthy after {name}")
                    server.stop()
                    server.start()
                results.append((name, outcome))
        finally:
            server.stop()
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, nargs="?", default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds a request may take before it is a hang")
    ap.add_argument("--model", help="a GGUF model to serve (default: a tiny random one, which tokenises little "
                    "text; the offline default model exercises generation: python -c 'import lminf_gguf; "
                    "print(lminf_gguf.default_model_path())')")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    results = run(args.n, args.seed, args.timeout, log=lambda s: print(s, file=sys.stderr), model=args.model)
    counts = Counter(o for _, o in results)
    print(f"{len(results)} requests: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    bad = [(name, o) for name, o in results if o in FAILURES]
    for name, o in bad[:20]:
        print(f"FAIL {o}: {name}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([{"case": n, "outcome": o} for n, o in results], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
