#!/usr/bin/env python3
"""Several conversations at once: aggregate decode tokens/s and time to first token with K concurrent streams.

Two designs side by side, in one process, with the same total CPU threads:
  slots    `lminf serve --parallel K` as it is built: K LM-Infinite sessions over one model, each its own llama.cpp
           context decoding in its own thread (threads per slot = total // K, at least 1); K streamed
           completions over HTTP at once (in-process server on loopback).
  batched  llama.cpp's own batched decoding: one plain context with K sequences, one llama_decode per step for all
           K next tokens (greedy), no HTTP and no LM-Infinite cache: what batching the slots would gain.

Time it on a quiet machine (nothing else running; threads collapse when the CPU is oversubscribed):

    python benchmarks/parallel.py --threads 2 --streams 1 2 4 --max-tokens 96 --json results/parallel.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from pathlib import Path

import numpy as np

PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. The story should have a "
          "beginning, a middle and an end.")


def _stream(host, port, body, out: dict) -> None:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    usage = None
    for line in resp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk.get("choices") and chunk["choices"][0]["text"]:
            first = time.perf_counter()
        usage = chunk.get("usage") or usage
    conn.close()
    out.update(ttft=(first or time.perf_counter()) - t0, end=time.perf_counter(), start=t0,
               tokens=usage["completion_tokens"], prompt_tokens=usage["prompt_tokens"])


def run_slots(model, k: int, threads: int, max_tokens: int, n_local: int) -> dict:
    from lminf_gguf.server import make_server
    from lminf_gguf.slots import open_sessions

    pool = open_sessions(model, k, n_local=n_local, n_threads=max(1, threads // k))
    server = make_server(pool, "127.0.0.1", 0, log=False)
    host, port = server.server_address[:2]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "logit_bias": {"2": -100, "0": -100}}
        _stream(host, port, dict(body, max_tokens=4), {})  # warm-up
        results = [{} for _ in range(k)]
        ts = [threading.Thread(target=_stream, args=(host, port, body, r)) for r in results]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        server.shutdown()
        server.server_close()
        pool.close()
    # decode rate: tokens generated after each stream's first token, over the span all streams were decoding
    t_first = max(r["start"] + r["ttft"] for r in results)
    t_end = min(r["end"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return dict(design="slots", streams=k, threads_per_slot=max(1, threads // k), tokens=tokens,
                wall_s=wall, aggregate_tok_s=tokens / wall,
                ttft_mean_s=float(np.mean([r["ttft"] for r in results])),
                ttft_max_s=max(r["ttft"] for r in results), overlap_s=max(0.0, t_end - t_first),
                # after the first token: the streams' own decode rates, summed (they overlap: see overlap_s)
                decode_tok_s=sum((r["tokens"] - 1) / (r["end"] - r["start"] - r["ttft"]) for r in results))


def run_batched(model, k: int, threads: int, max_tokens: int) -> dict:
    """K greedy sequences in one plain llama.cpp context, one llama_decode per step."""
    from lminf_gguf import _lib  # noqa: F401 (binds llama_cpp's raw API to the patched library)
    from lminf_gguf._lib import llama_raw
    from lminf_gguf.models import Model

    m = Model(model)
    prompt = m.llama.tokenize(PROMPT.encode(), True, False)
    cparams = llama_raw.llama_context_default_params()
    cparams.n_ctx = k * (len(prompt) + max_tokens + 16)
    cparams.n_batch = max(len(prompt), k)
    cparams.n_seq_max = k
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.no_perf = True
    ctx = llama_raw.llama_init_from_model(m.llama.model, cparams)
    batch = llama_raw.llama_batch_init(max(len(prompt), k), 0, k)
    n_vocab = m.n_vocab
    try:
        def decode(items, logits_for):
            batch.n_tokens = len(items)
            for j, (tok, pos, seq) in enumerate(items):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, pos, 1
                batch.seq_id[j][0] = seq
                batch.logits[j] = j in logits_for
            assert llama_raw.llama_decode(ctx, batch) == 0
            return np.ctypeslib.as_array(llama_raw.llama_get_logits(ctx), shape=(len(logits_for), n_vocab))

        t0 = time.perf_counter()
        last = []
        for s in range(k):  # prompts one after another, as the slots would receive them
            out = decode([(t, p, s) for p, t in enumerate(prompt)], {len(prompt) - 1})
            last.append(int(np.argmax(out[0])))
        ttft = time.perf_counter() - t0
        pos = len(prompt)
        for _ in range(max_tokens - 1):
            out = decode([(last[s], pos, s) for s in range(k)], set(range(k)))
            last = [int(np.argmax(out[s])) for s in range(k)]
            pos += 1
        wall = time.perf_counter() - t0
    finally:
        llama_raw.llama_batch_free(batch)
        llama_raw.llama_free(ctx)
        m.close()
    tokens = k * max_tokens
    return dict(design="batched", streams=k, threads=threads, tokens=tokens, wall_s=wall,
                aggregate_tok_s=tokens / wall, ttft_mean_s=ttft, ttft_max_s=ttft,
                decode_tok_s=k * (max_tokens - 1) / (wall - ttft))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=2, help="total CPU threads, all streams together")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--n-local", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args()

    rows = []
    for k in args.streams:
        for fn in (lambda: run_slots(args.model, k, args.threads, args.max_tokens, args.n_local),
                   lambda: run_batched(args.model, k, args.threads, args.max_tokens)):
            rows.append(fn())
            print(json.dumps(rows[-1]), flush=True)
    base = {r["design"]: r["aggregate_tok_s"] for r in rows if r["streams"] == args.streams[0]}
    dbase = {r["design"]: r["decode_tok_s"] for r in rows if r["streams"] == args.streams[0]}
    print(f"\n| design | streams | aggregate tok/s (vs {args.streams[0]}) | decode tok/s (vs {args.streams[0]}) | "
          "TTFT mean / max (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['design']} | {r['streams']} | {r['aggregate_tok_s']:.1f} "
              f"({r['aggregate_tok_s'] / base[r['design']]:.2f}x) | {r['decode_tok_s']:.1f} "
              f"({r['decode_tok_s'] / dbase[r['design']]:.2f}x) | {r['ttft_mean_s']:.2f} / {r['ttft_max_s']:.2f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
