#!/usr/bin/env python3
"""Speed and memory of LM-Infinite against vanilla llama.cpp, side by side in one run, as ratios.

Each measurement runs in its own process (clean peak RSS): prefill a stream of `depth` tokens (Austen text,
scripts/fetch_data.py) in batches, then decode `n_decode` tokens one at a time. Printed as a markdown table and
written as JSON. Modes: vanilla (n_ctx = depth + n_decode), lminf (G, L given), and lminf at depth G + L (the
floor: the same attention work per token as lminf at any depth).

    python benchmarks/bench.py --depths 2048 8192 --n-local 4096 --json results/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import austen_path  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent.parent


def kv_bytes_per_cell(llm) -> int:
    from lminf_gguf._lib import llama_raw
    m = llm.model.llama_model
    n_layer = llama_raw.llama_model_n_layer(m)
    n_head, n_head_kv = llama_raw.llama_model_n_head(m), llama_raw.llama_model_n_head_kv(m)
    head_dim = llama_raw.llama_model_n_embd(m) // n_head
    return n_layer * 2 * n_head_kv * head_dim * 2  # K and V, f16


def measure_one(args) -> dict:
    import numpy as np
    from lminf_gguf import LMInfinite

    text = Path(args.text).read_text(encoding="utf-8")
    kw = dict(mode=args.mode, n_threads=args.threads, n_batch=args.n_batch, flash_attn=False)
    if args.mode == "vanilla":
        kw["n_ctx"] = args.depth + args.n_decode + 16
    else:
        kw.update(n_global=args.n_global, n_local=args.n_local)
    llm = LMInfinite(args.model, **kw)
    tokens = llm.tokenize(text[: args.depth * 8])[: args.depth + args.n_decode]
    if len(tokens) < args.depth + args.n_decode:
        raise SystemExit("text too short for this depth")
    llm.reset()
    t0 = time.perf_counter()
    for _ in llm.eval(tokens[: args.depth]):
        pass
    prefill_s = time.perf_counter() - t0
    per_token = []
    for tok in tokens[args.depth: args.depth + args.n_decode]:
        t = time.perf_counter()
        for _ in llm.eval([tok]):
            pass
        per_token.append(time.perf_counter() - t)
    info = llm.cache_info()
    return dict(mode=args.mode, depth=args.depth, n_local=args.n_local if args.mode != "vanilla" else None,
                prefill_tok_s=args.depth / prefill_s, decode_ms=1000 * float(np.median(per_token)),
                decode_ms_max=1000 * float(np.max(per_token)), cells=info["cells_total"],
                kv_bytes=info["cells_total"] * kv_bytes_per_cell(llm),
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run(args, mode, depth) -> dict:
    cmd = [sys.executable, __file__, "_one", "--mode", mode, "--depth", str(depth), "--text", args.text,
           "--n-global", str(args.n_global), "--n-local", str(args.n_local), "--n-decode", str(args.n_decode),
           "--n-batch", str(args.n_batch), "--threads", str(args.threads)]
    if args.model:
        cmd += ["--model", args.model]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="table", choices=["table", "_one"])
    ap.add_argument("--model")
    ap.add_argument("--text", help="default: austen.txt from scripts/fetch_data.py")
    ap.add_argument("--depths", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    ap.add_argument("--depth", type=int)
    ap.add_argument("--mode", default="lminf")
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--n-local", type=int, default=4096)
    ap.add_argument("--n-decode", type=int, default=32)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.text is None:
        args.text = austen_path()

    if args.what == "_one":
        print(json.dumps(measure_one(args)))
        return

    rows = []
    floor = run(args, "lminf", args.n_global + args.n_local)
    print("| depth | vanilla prefill tok/s | lminf prefill tok/s | ratio | vanilla decode ms | lminf decode ms | "
          "ratio | lminf / floor decode | vanilla KV MB | lminf KV MB | ratio | vanilla RSS MB | lminf RSS MB |")
    print("|" + "---|" * 13)
    for depth in args.depths:
        v, l = run(args, "vanilla", depth), run(args, "lminf", depth)
        rows.append(dict(vanilla=v, lminf=l))
        print(f"| {depth} | {v['prefill_tok_s']:.0f} | {l['prefill_tok_s']:.0f} | "
              f"{l['prefill_tok_s'] / v['prefill_tok_s']:.2f}x | {v['decode_ms']:.1f} | {l['decode_ms']:.1f} | "
              f"{v['decode_ms'] / l['decode_ms']:.2f}x | {l['decode_ms'] / floor['decode_ms']:.2f} | "
              f"{v['kv_bytes'] / 2**20:.0f} | {l['kv_bytes'] / 2**20:.0f} | {v['kv_bytes'] / l['kv_bytes']:.2f}x | "
              f"{v['peak_rss_mb']:.0f} | {l['peak_rss_mb']:.0f} |", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = dict(machine=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                    threads=args.threads, n_global=args.n_global, n_local=args.n_local, floor=floor)
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
