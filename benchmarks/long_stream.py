#!/usr/bin/env python3
"""Long-stream run: stream N tokens through LM-Infinite, sampling RSS and throughput along the way.

Checks what a million-token stream needs: the RSS plateau after warm-up (growth in %), no NaN or inf in the
per-token losses, position rebasing exercised, throughput per segment; and the perplexity per power-of-two
position bucket. The text repeats when N exceeds it (Austen is ~0.93M tokens for the default model).

    python benchmarks/long_stream.py --tokens 1048576 --n-local 2048 --json results/long_stream.json

The JSON is rewritten at every sample, so an interrupted run keeps its figures so far ("complete": false).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from common import austen_path, rss_mb  # benchmarks/common.py


def text_chunks(path: str):
    """The file's text in 1 MB pieces, repeated as often as needed."""
    while True:
        with open(path, encoding="utf-8") as f:
            while piece := f.read(1 << 20):
                yield piece


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--model")
    ap.add_argument("--text", help="default: austen.txt from scripts/fetch_data.py")
    ap.add_argument("--mode", default="lminf")
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--n-local", type=int, default=2048)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.text is None:
        args.text = austen_path()

    from lminf_gguf import LMInfinite

    llm = LMInfinite(args.model, mode=args.mode, n_global=args.n_global, n_local=args.n_local,
                     n_batch=args.n_batch, n_threads=args.threads)
    samples, parts, done = [], [], 0
    t0 = last_t = time.perf_counter()
    last_done = 0
    for part in llm.iter_nll(text_chunks(args.text)):
        parts.append(part.astype(np.float32))
        done += len(part)
        now = time.perf_counter()
        if now - last_t >= 10 or done + 1 >= args.tokens:
            samples.append(dict(tokens=done + 1, seconds=now - t0, rss_mb=rss_mb(),
                                tok_s=(done - last_done) / (now - last_t), **{k: llm.cache_info()[k] for k in
                                                                            ("cells_used", "position", "rebases")}))
            s = samples[-1]
            print(f"{s['tokens']:>9d} tokens  {s['seconds']:7.0f} s  {s['tok_s']:6.1f} tok/s  RSS {s['rss_mb']:6.0f} MB"
                  f"  cells {s['cells_used']}  position {s['position']}  rebases {s['rebases']}", flush=True)
            last_t, last_done = now, done
            if args.json:
                write_result(args, parts, samples, t0, complete=False)
        if done + 1 >= args.tokens:
            break
    result = write_result(args, parts, samples, t0, complete=True)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


def write_result(args, parts, samples, t0, complete: bool) -> dict:
    from lminf_gguf import evaluate

    nll = np.concatenate(parts)[: args.tokens - 1]
    warm = [s["rss_mb"] for s in samples if s["tokens"] >= min(4 * args.n_local + 65536, args.tokens // 4)]
    result = dict(
        tokens=len(nll) + 1, complete=complete, mode=args.mode, n_global=args.n_global, n_local=args.n_local,
        seconds=time.perf_counter() - t0, finite=bool(np.isfinite(nll).all()),
        rss_growth_after_warmup_pct=100 * (max(warm) - warm[0]) / warm[0] if warm else None,
        buckets=evaluate.bucket_perplexity(nll), samples=samples)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
