#!/usr/bin/env python3
"""Exactness table: relative error of the patched llama.cpp against the PyTorch reference, per mode and set-up.

Prints one row per (model, KV type, flash attention, mode) with the worst relative error ||a - b|| / ||b|| over
T in {L-1, L, L+1, 3L+7, 20L}, G in {0, 4, 10}, n_ubatch in {1, 7, 64}, L = 16, and writes the rows as JSON.
Mode lminf-topk (k = 3 from layer 1 at distance L/2, store of the KV type; exact scan, and the block index with
blocks of 4 and 2 blocks scanned; topk-all: k = 1000, the whole middle, so no choice can flip) uses n_ubatch in
{1, 7, 16} (it needs n_ubatch <= L) and T in {3L+7, 20L}.
The same check runs on a GPU with --n-gpu-layers 99 (CUDA or Metal build). --families runs the other
architectures instead (ALiBi: mpt, bloom; RoPE: llama 3.1, mistral, qwen3, phi3) over the same grid of
vanilla, mask and lminf.

    python benchmarks/exactness.py [--n-gpu-layers 99] [--families | --topk-only] [--json results/exactness.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import MODEL_CONFIGS, random_tokens, rel_err  # noqa: E402
from reference import TopK, load_gguf  # noqa: E402
from tiny_models import write_tiny_alibi, write_tiny_llama, write_tiny_phi3, write_tiny_qwen3  # noqa: E402

import lminf_gguf  # noqa: E402

SETUPS = [  # (model, kv type, flash attention)
    ("f32-gqa2", "f32", False),
    ("f32-gqa8", "f32", False),
    ("f32-yarn2", "f32", False),
    ("f32-gqa2", "f16", False),
    ("f32-gqa2", "f16", True),
    ("f32-yarn2", "f16", True),
    ("f16-gqa2", "f32", False),
    ("f32-h64", "f16", True),   # heads of 64: on a GPU, the rows that reach its flash-attention kernels
]

FAMILIES = [  # (name, writer, kv type, flash attention)
    ("mpt", lambda p: write_tiny_alibi(p, arch="mpt", seed=10), "f32", False),
    ("mpt", lambda p: write_tiny_alibi(p, arch="mpt", seed=10), "f16", True),
    ("bloom", lambda p: write_tiny_alibi(p, arch="bloom", seed=11), "f32", False),
    ("bloom", lambda p: write_tiny_alibi(p, arch="bloom", seed=11), "f16", True),
    ("llama3.1", lambda p: write_tiny_llama(p, rope_base=500000.0, rope_freqs=True, seed=41), "f32", False),
    ("mistral", lambda p: write_tiny_llama(p, n_head=8, n_head_kv=2, rope_base=1e6, seed=42), "f32", False),
    ("qwen3", lambda p: write_tiny_qwen3(p, seed=43), "f32", False),
    ("phi3", lambda p: write_tiny_phi3(p, seed=44), "f32", False),
]


def mode_rows(name, path, ref, kv, flash, n_gpu_layers, L=16) -> list:
    """One row per mode: the worst relative error over the grid of the module doc."""
    rows = []
    for mode in ("vanilla", "mask", "lminf"):
        worst = 0.0
        for g in (0, 4, 10):
            for ub in (1, 7, 64):
                kw = dict(n_ctx=512) if mode == "vanilla" else dict(n_global=g, n_local=L, dist_max=L)
                llm = lminf_gguf.LMInfinite(path, mode=mode, type_k=kv, type_v=kv, flash_attn=flash,
                                            n_batch=ub, n_gpu_layers=n_gpu_layers, **kw)
                used = llm.cache_info()["flash_attn"]  # what llama.cpp resolved (the row says what ran)
                for T in (L - 1, L, L + 1, 3 * L + 7, 20 * L):
                    if mode == "vanilla" and T > 64:  # the tiny models' trained context
                        continue
                    tokens = random_tokens(T, seed=T + g)
                    want = ref.logits(tokens, mode=mode, n_global=g, n_local=L, dist_max=L)
                    worst = max(worst, rel_err(llm.logits(tokens), want))
                llm.close()
                if mode == "vanilla":
                    break
            if mode == "vanilla":
                break
        rows.append(dict(model=name, kv=kv, flash_attn=used, mode=mode, max_rel_err=worst))
        print(f"{name:10s} {kv:4s} {str(used):5s} {mode:7s} {worst:12.2e}", flush=True)
    return rows


def topk_worst(path, ref, kv, flash, block, n_gpu_layers, k=3, L=16):
    """(worst relative error, what llama.cpp resolved flash attention to)."""
    worst, used = 0.0, None
    for g in (0, 4, 10):
        for ub in (1, 7, 16):
            llm = lminf_gguf.LMInfinite(path, mode="lminf-topk", type_k=kv, type_v=kv, n_batch=ub, n_global=g,
                                        n_local=L, dist_max=L, topk=k, topk_layer=1, topk_dist=L // 2,
                                        store_type=kv, store_segment=16, topk_block=block, topk_blocks=2,
                                        flash_attn=flash, n_gpu_layers=n_gpu_layers)
            used = llm.cache_info()["flash_attn"]
            for T in (3 * L + 7, 20 * L):
                tokens = random_tokens(T, seed=T + g)
                rows = [min(T, c + ub) - 1 for c in range(0, T, ub)]
                topk = TopK(k, 1, L // 2, rows, block=block, n_blocks=2, seg_rows=16, n_batch=ub)
                want = ref.logits(tokens, mode="lminf", n_global=g, n_local=L, dist_max=L, topk=topk)
                worst = max(worst, rel_err(llm.logits(tokens), want))
            llm.close()
    return worst, used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-gpu-layers", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--dir", default="/tmp/lminf-exactness", help="where the tiny models are written")
    ap.add_argument("--families", action="store_true", help="the other architectures instead of llama")
    ap.add_argument("--topk-only", action="store_true", help="only the lminf-topk rows")
    args = ap.parse_args()

    Path(args.dir).mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'model':10s} {'kv':4s} {'flash':5s} {'mode':7s} {'max rel err':>12s}")
    if args.families:
        for name, write, kv, flash in FAMILIES:
            path = write(Path(args.dir) / f"{name}.gguf")
            rows += mode_rows(name, path, load_gguf(path), kv, flash, args.n_gpu_layers)
    for name, kv, flash in [] if args.families else SETUPS:
        path = write_tiny_llama(Path(args.dir) / f"{name}.gguf", seed=1, **MODEL_CONFIGS[name])
        ref = load_gguf(path)
        if not args.topk_only:
            rows += mode_rows(name, path, ref, kv, flash, args.n_gpu_layers)
        # k = 1000 takes the whole middle: no choice left to flip on a near tie under f16 rounding
        for label, block, k in (("topk", 0, 3), ("topk+index", 4, 3), ("topk-all", 0, 1000)):
            worst, used = topk_worst(path, ref, kv, flash, block, args.n_gpu_layers, k=k)
            rows.append(dict(model=name, kv=kv, flash_attn=used, mode=label, max_rel_err=worst))
            print(f"{name:10s} {kv:4s} {str(used):5s} {label:7s} {worst:12.2e}", flush=True)

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = dict(machine=platform.platform(), n_gpu_layers=args.n_gpu_layers)
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    main()
