#!/usr/bin/env python3
"""Prefill and decode speed of every attention path at the same KV budget, side by side in one process.

Rows: `lminf` (the exact distance ceiling) with flash attention on and off, `mask` (the same Λ window without the
ceiling) and `shift` (llama.cpp's context shift, n_ctx = G + L + n_batch) with flash attention on and off, and
`vanilla` at depth G + L (the same attention span, no bookkeeping); `lminf-topk` (lminf plus the top-k middle
tokens, default k, layer and distance, exact scan) with flash attention on and off. The model is loaded once; the
configurations are measured in interleaved rounds and each figure is the best of the rounds, because timings on a
laptop or a shared machine drift by 10-20 % between runs. Run it alone, on a quiet machine, with an explicit thread
count.

  prefill   tokens/s over `--prefill` tokens of held-out text, fed in batches of n_batch
  decode    median ms per token for `--decode` tokens after a `--prompt`-token prefix (teacher-forced)
(The cost of a rebase or a context shift is measured by benchmarks/latency.py, over thousands of decoded tokens.)

    python benchmarks/flash.py --threads 2 --n-local 1024 --json results/flash.json
    python benchmarks/flash.py --threads 8 --n-gpu-layers 99   # a CUDA build with -DGGML_CUDA_FA_KQ_BIAS=ON
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

# (label, mode, flash_attn)
CONFIGS = [
    ("lminf, flash on", "lminf", True),
    ("lminf, flash off", "lminf", False),
    ("mask, flash on", "mask", True),
    ("mask, flash off", "mask", False),
    ("shift, flash on", "shift", True),
    ("shift, flash off", "shift", False),
    ("vanilla at G + L, flash on", "vanilla", True),
    ("lminf-topk, flash on", "lminf-topk", True),
    ("lminf-topk, flash off", "lminf-topk", False),
]


def open_session(model, args, mode: str, flash: bool):
    from lminf_gguf import LMInfinite

    kw = dict(mode=mode, flash_attn=flash, n_threads=args.threads, n_batch=args.n_batch, n_gpu_layers=args.n_gpu_layers)
    if mode == "vanilla":
        kw["n_ctx"] = args.n_global + args.n_local + args.n_batch
    else:
        kw.update(n_global=args.n_global, n_local=args.n_local)
    return LMInfinite(model, **kw)


def prefill_tps(llm, tokens) -> float:
    llm.reset()
    t = time.perf_counter()
    for _ in llm.eval(tokens):
        pass
    return len(tokens) / (time.perf_counter() - t)


def decode_ms(llm, prompt, follow) -> float:
    """Median ms per decoded token."""
    llm.reset()
    llm.feed(prompt)
    ms = []
    for tok in follow:
        t = time.perf_counter()
        for _ in llm.eval([tok]):
            pass
        ms.append(1000 * (time.perf_counter() - t))
    return float(np.median(ms))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--text", help="default: austen.txt from scripts/fetch_data.py")
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--n-local", type=int, default=1024)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=6144, help="tokens prefilled per measurement")
    ap.add_argument("--prompt", type=int, default=4096, help="tokens before the decoded ones")
    ap.add_argument("--decode", type=int, default=48, help="tokens decoded one at a time")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each figure is the best")
    ap.add_argument("--threads", type=int, required=True, help="explicit: time on a quiet machine")
    ap.add_argument("--only", nargs="+", help="labels (or modes) to run, default: all")
    ap.add_argument("--n-gpu-layers", type=int, default=0, help="99: every layer on the GPU (CUDA / Metal builds)")
    ap.add_argument("--json")
    args = ap.parse_args()

    from lminf_gguf import Model
    from lminf_gguf.text import FileChunks, iter_token_blocks

    configs = [c for c in CONFIGS if not args.only or c[0] in args.only or c[1] in args.only]
    with Model(args.model) as model:
        # held-out text: the stream starts after the first 20,000 tokens of the book
        need, skip = max(args.prefill, args.prompt + args.decode), 20000
        with open_session(model, args, "mask", False) as tok:
            tokens = []
            for block in iter_token_blocks(tok.tokenize, FileChunks(args.text or austen_path())):
                tokens += block
                if len(tokens) >= skip + need:
                    break
        tokens = tokens[skip:skip + need]
        if len(tokens) < need:
            raise SystemExit(f"the text is too short for --prefill/--prompt/--decode ({len(tokens)} tokens)")

        # vanilla decodes at depth G + L: its prompt is the last G + L tokens of the others' prompt
        span = args.n_global + args.n_local
        best = {label: dict(prefill=0.0, decode=float("inf")) for label, _, _ in configs}
        for r in range(args.rounds):
            for label, mode, flash in configs:
                with open_session(model, args, mode, flash) as llm:
                    b = best[label]
                    pre = tokens[:min(args.prefill, span)] if mode == "vanilla" else tokens[:args.prefill]
                    b["prefill"] = max(b["prefill"], prefill_tps(llm, pre))
                    prompt = tokens[args.prompt - span:args.prompt] if mode == "vanilla" else tokens[:args.prompt]
                    b["decode"] = min(b["decode"], decode_ms(llm, prompt, tokens[args.prompt:args.prompt + args.decode]))
                    b["flash_used"] = llm.cache_info()["flash_attn"]
                    if b["flash_used"] != flash:
                        raise SystemExit(f"{label}: llama.cpp resolved flash attention to {b['flash_used']}")
                print(f"round {r + 1}: {label}: {b['prefill']:.0f} tok/s, {b['decode']:.2f} ms/token", flush=True)

    def ratio(label, other, key):
        if label not in best or other not in best:
            return "-"
        a, b = best[label][key], best[other][key]
        return f"{a / b:.2f}" if key == "prefill" else f"{b / a:.2f}"

    where = f"{args.n_gpu_layers} layers on the GPU, " if args.n_gpu_layers else ""
    print(f"\nG = {args.n_global}, L = {args.n_local}, n_batch = {args.n_batch}, {where}{args.threads} threads, "
          f"prefill {args.prefill} tokens, decode {args.decode} tokens after {args.prompt} (vanilla: prefill "
          f"{min(args.prefill, span)}, decode after {span}); best of {args.rounds} interleaved rounds")
    print("| path | prefill tok/s | decode ms/token | prefill vs shift (flash on) | decode vs shift (flash on) |"
          " prefill vs mask (flash on) | decode vs mask (flash on) |")
    print("|" + "---|" * 7)
    for label, _, _ in configs:
        b = best[label]
        print(f"| {label} | {b['prefill']:.0f} | {b['decode']:.2f} | {ratio(label, 'shift, flash on', 'prefill')} | "
              f"{ratio(label, 'shift, flash on', 'decode')} | {ratio(label, 'mask, flash on', 'prefill')} | "
              f"{ratio(label, 'mask, flash on', 'decode')} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = dict(machine=platform.platform(), cpus=os.cpu_count(), threads=args.threads, n_global=args.n_global,
                    n_local=args.n_local, n_batch=args.n_batch, prefill=args.prefill, prompt=args.prompt,
                    decode=args.decode, rounds=args.rounds, n_gpu_layers=args.n_gpu_layers)
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=best), indent=1))


if __name__ == "__main__":
    main()
