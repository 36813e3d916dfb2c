#!/usr/bin/env python3
"""Per-token decode latency of `shift` against `lminf` at the same KV budget: does either stall?

llama.cpp's context shift drops half of the window and re-rotates the rest each time the cache fills; LM-Infinite
re-rotates its window (a rebase) every ~L + n_batch tokens to keep positions small. Both modes prefill the same
prefix of Austen, then decode the following tokens one at a time (teacher-forced, so both see the same tokens),
timing each decode and noting which ones shifted or rebased. Printed as a table (median, p99, max, max/median,
median of the event tokens) and written as JSON with every latency.

    python benchmarks/latency.py --n-local 2048 --tokens 6144 --json results/latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from common import austen_path  # benchmarks/common.py


def measure(args, mode: str, tokens: list) -> dict:
    from lminf_gguf import LMInfinite

    flash = {"auto": None, "on": True, "off": False}[args.flash_attn]
    with LMInfinite(args.model, mode=mode, n_global=args.n_global, n_local=args.n_local, n_batch=args.n_batch,
                    n_threads=args.threads, flash_attn=flash) as llm:
        llm.feed(tokens[:args.prefix])
        latency, events = [], []
        for tok in tokens[args.prefix:args.prefix + args.tokens]:
            before = llm.cache_info()
            t = time.perf_counter()
            for _ in llm.eval([tok]):
                pass
            latency.append(1000 * (time.perf_counter() - t))
            after = llm.cache_info()
            events.append(after["shifts"] + after["rebases"] > before["shifts"] + before["rebases"])
        info = llm.cache_info()
    ms, ev = np.array(latency), np.array(events)
    med = float(np.median(ms))
    return dict(mode=mode, median_ms=med, p99_ms=float(np.percentile(ms, 99)), max_ms=float(ms.max()),
                max_over_median=float(ms.max()) / med, events=int(ev.sum()),
                event_median_ms=float(np.median(ms[ev])) if ev.any() else None,
                over_1_5x=int((ms > 1.5 * med).sum()), cells=info["cells_total"], latency_ms=latency,
                event_at=[int(i) for i in np.flatnonzero(ev)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--text", help="default: austen.txt from scripts/fetch_data.py")
    ap.add_argument("--modes", nargs="+", default=["shift", "lminf"])
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--n-local", type=int, default=2048)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--prefix", type=int, default=None, help="tokens prefilled first (default: 2 L)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens decoded one at a time (default: 3 L)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.prefix = 2 * args.n_local if args.prefix is None else args.prefix
    args.tokens = 3 * args.n_local if args.tokens is None else args.tokens

    from lminf_gguf import LMInfinite
    from lminf_gguf.text import FileChunks, iter_token_blocks

    need = args.prefix + args.tokens
    with LMInfinite(args.model, n_local=16, n_threads=1) as tok:
        tokens = []
        for block in iter_token_blocks(tok.tokenize, FileChunks(args.text or austen_path())):
            tokens += block
            if len(tokens) >= need:
                break
    if len(tokens) < need:
        raise SystemExit(f"the text has {len(tokens)} tokens, fewer than --prefix + --tokens = {need}")

    rows = [measure(args, mode, tokens) for mode in args.modes]
    print(f"decode latency, {args.tokens} tokens after a {args.prefix}-token prefix, G = {args.n_global}, "
          f"L = {args.n_local}, n_batch = {args.n_batch}, {args.threads} threads, flash attention {args.flash_attn}")
    print("| mode | median ms | p99 ms | max ms | max / median | tokens > 1.5x median | shifts or rebases | "
          "median ms at those |")
    print("|" + "---|" * 8)
    for r in rows:
        at = f"{r['event_median_ms']:.1f}" if r["event_median_ms"] is not None else "-"
        print(f"| {r['mode']} | {r['median_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | "
              f"{r['max_over_median']:.2f} | {r['over_1_5x']} | {r['events']} | {at} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = dict(machine=platform.platform(), cpus=os.cpu_count(), threads=args.threads, flash_attn=args.flash_attn,
                    n_global=args.n_global,
                    n_local=args.n_local, n_batch=args.n_batch, prefix=args.prefix, tokens=args.tokens)
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows)))


if __name__ == "__main__":
    main()
