#!/usr/bin/env python3
"""Server under load: N streamed completions from C concurrent clients over loopback, every fifth client request
dropped after its first event; prints errors, requests per second and the server process's RSS along the way.

The server runs in this process (make_server on 127.0.0.1, a free port), so RSS is the server's.

    python benchmarks/server_load.py --requests 200 --clients 8 --n-local 128 --json results/server_load.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time
from pathlib import Path

from common import rss_mb  # benchmarks/common.py


def streamed(host, port, body) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    if resp.status != 200 or not text.rstrip().endswith("data: [DONE]"):
        raise RuntimeError(f"status {resp.status}: {text[-200:]!r}")
    return text


def dropped(host, port, body) -> None:
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, port), timeout=600)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while b"data: " not in got:
        part = sock.recv(4096)
        if not part:
            raise RuntimeError(f"closed before the first event: {got[-200:]!r}")
        got += part
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--n-local", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()

    from lminf_gguf import LMInfinite
    from lminf_gguf.server import make_server

    llm = LMInfinite(args.model, n_local=args.n_local, n_batch=min(32, args.n_local), n_threads=args.threads)
    server = make_server(llm, "127.0.0.1", 0, log=False)
    host, port = server.server_address[:2]
    threading.Thread(target=server.serve_forever, daemon=True).start()

    lock = threading.Lock()
    counts = {"done": 0, "dropped": 0}
    errors, samples = [], [dict(requests=0, rss_mb=rss_mb())]
    t0 = time.perf_counter()

    def client(c):
        for r in range(c, args.requests, args.clients):
            body = {"prompt": f"Number {r} is", "max_tokens": args.max_tokens, "stream": True, "seed": r}
            try:
                (dropped if r % 5 == 4 else streamed)(host, port, body)
                with lock:
                    counts["dropped" if r % 5 == 4 else "done"] += 1
                    n = sum(counts.values())
                    if n % 20 == 0:
                        samples.append(dict(requests=n, seconds=time.perf_counter() - t0, rss_mb=rss_mb()))
                        print(samples[-1], flush=True)
            except Exception as e:
                errors.append(f"request {r}: {e!r}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/health")
    healthy = conn.getresponse().status == 200
    server.shutdown()
    warm = [s["rss_mb"] for s in samples if s["requests"] >= args.requests // 5]
    result = dict(requests=args.requests, clients=args.clients, errors=errors, healthy_after=healthy, **counts,
                  seconds=seconds, requests_per_s=args.requests / seconds,
                  rss_growth_after_warmup_pct=100 * (max(warm) - warm[0]) / warm[0] if warm else None,
                  samples=samples)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
