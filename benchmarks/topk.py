#!/usr/bin/env python3
"""Top-k middle tokens ("lminf-topk"): decode cost against plain "lminf", and the block index's recall and speed-up.

1. cost: prefill `depth` tokens of Austen, then decode `n_decode` tokens one at a time (median ms per token), for
   lminf, lminf-topk with the exact scan of the middle, and lminf-topk with the block index, with flash attention
   (the default) and without; with the store's bytes per token and size. One process per cell, as in bench.py.
   Run it alone (nothing else on the CPU) with an explicit --threads.
2. recall (--recall): on the default model's real queries and keys, computed by the float64 PyTorch reference
   (tests/reference.py) over `recall_tokens` tokens: the share of the exact scan's top-k middle keys that the
   block index also picks, per (query row, layer, KV head), for each block size and number of blocks scanned.

    python benchmarks/topk.py --depths 16384 65536 --n-local 2048 --json results/topk.json
    python benchmarks/topk.py --recall --json results/topk_recall.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import austen_path  # benchmarks/common.py
from topk_store import status_kb, store_disk_bytes  # benchmarks/topk_store.py

ROOT = Path(__file__).resolve().parent.parent

CELLS = {  # name -> LMInfinite keyword arguments (flash attention: auto, i.e. on for the CPU, unless "flash off")
    "lminf": dict(mode="lminf"),
    "topk exact": dict(mode="lminf-topk"),
    "topk index": dict(mode="lminf-topk", topk_block=64, topk_blocks=8),
    "topk index, store_dir": dict(mode="lminf-topk", topk_block=64, topk_blocks=8, store_dir="{dir}"),
    "topk index, store_dir, from layer 12": dict(mode="lminf-topk", topk_block=64, topk_blocks=8, store_dir="{dir}",
                                                 topk_layer=12),
    "topk index, 4 units": dict(mode="lminf-topk", topk_block=64, topk_blocks=8, topk_units=4),
    "topk exact, flash off": dict(mode="lminf-topk", flash_attn=False),
    "topk index, flash off": dict(mode="lminf-topk", topk_block=64, topk_blocks=8, flash_attn=False),
}


def measure_one(args) -> dict:
    import numpy as np
    from lminf_gguf import LMInfinite

    store_dir = tempfile.mkdtemp(prefix="lminf_store_")
    cell = {k: (v.replace("{dir}", store_dir) if isinstance(v, str) else v) for k, v in CELLS[args.cell].items()}
    llm = LMInfinite(args.model, n_local=args.n_local, n_batch=args.n_batch, n_threads=args.threads, **cell)
    text = Path(austen_path()).read_text(encoding="utf-8")
    tokens = llm.tokenize(text[: (args.depth + args.n_decode) * 8])[: args.depth + args.n_decode]
    if len(tokens) < args.depth + args.n_decode:
        sys.exit(f"the text has {len(tokens)} tokens, fewer than --depths + --n-decode")
    t0 = time.perf_counter()
    for _ in llm.eval(tokens[: args.depth]):
        pass
    prefill_s = time.perf_counter() - t0
    per_token = []
    for tok in tokens[args.depth:]:
        t = time.perf_counter()
        for _ in llm.eval([tok]):
            pass
        per_token.append(time.perf_counter() - t)
    info = llm.cache_info()
    mem = status_kb()
    disk = store_disk_bytes(store_dir if "store_dir" in cell else None)
    shutil.rmtree(store_dir, ignore_errors=True)
    return dict(cell=args.cell, depth=args.depth, flash_attn=info["flash_attn"], rss_mb=mem["VmRSS"] / 1024,
                hwm_mb=mem["VmHWM"] / 1024, anon_mb=mem["RssAnon"] / 1024, file_mb=mem["RssFile"] / 1024,
                disk_mb=disk / 2**20,
                prefill_tok_s=args.depth / prefill_s,
                decode_ms=1000 * float(np.median(per_token)), cells_used=info["cells_used"],
                store_bytes_per_token=info.get("store_bytes_per_token", 0), store_mb=info.get("store_bytes", 0) / 2**20)


def recall(args) -> list:
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    from reference import RefModel, TopK, load_gguf
    from lminf_gguf import LMInfinite, default_model_path

    path = args.model or default_model_path()
    tokens = LMInfinite(path, n_local=256, n_threads=1).tokenize(
        Path(austen_path()).read_text(encoding="utf-8")[: args.recall_tokens * 8])[: args.recall_tokens]
    settings = [(b, m) for b in (16, 32, 64) for m in (1, 2, 4, 8)]
    hits = {s: [] for s in settings}

    class Probe(RefModel):
        """The exact top-k forward; at each choosing row, also the block index's choice, compared."""

        def _topk_extra(self, q, k, middle, topk):
            res = super()._topk_extra(q, k, middle, topk)
            qd, k0 = self.rope(q, float(topk.dist)), self.rope(k, 0.0)
            rep = self.hp.n_head // self.hp.n_head_kv
            for i in topk.rows:
                mid = torch.nonzero(middle[i]).flatten()
                if len(mid) < 4 * topk.k:
                    continue
                for hk in range(self.hp.n_head_kv):
                    q_sel = qd[i, hk * rep:(hk + 1) * rep].sum(0)
                    exact = set(mid[torch.topk(k0[mid, hk] @ q_sel, topk.k).indices].tolist())
                    for b, m in settings:
                        probe = TopK(topk.k, topk.layer, topk.dist, topk.rows, block=b, n_blocks=m, seg_rows=1 << 20)
                        cand = probe.candidates(i, mid, k0, q_sel, hk)
                        got = set(cand[torch.topk(k0[cand, hk] @ q_sel, min(topk.k, len(cand))).indices].tolist())
                        hits[(b, m)].append(len(exact & got) / topk.k)
            return res

    ref = load_gguf(path)
    probe = Probe(ref.hp, ref.t)
    G, L = 10, args.recall_window
    rows = list(range(L + 4 * 5 + G, len(tokens), 64))
    probe.logits(tokens, mode="lminf", n_global=G, n_local=L, dist_max=L, topk=TopK(5, 4, L // 2, rows))
    return [dict(block=b, n_blocks=m, recall=sum(hits[(b, m)]) / len(hits[(b, m)]), samples=len(hits[(b, m)]),
                 middle_tokens=len(tokens) - L - G) for b, m in settings]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--depths", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--n-local", type=int, default=2048)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--n-decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    ap.add_argument("--recall", action="store_true", help="measure the block index's recall instead")
    ap.add_argument("--recall-tokens", type=int, default=2048)
    ap.add_argument("--recall-window", type=int, default=128)
    ap.add_argument("--json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "cell:depth", run one cell, print JSON
    args = ap.parse_args()

    if args.one:
        args.cell, depth = args.one.rsplit(":", 1)
        args.depth = int(depth)
        print(json.dumps(measure_one(args)))
        return
    if args.recall:
        rows = recall(args)
        print("| block | blocks scanned | recall of the exact top-5 |\n|---|---|---|")
        for r in rows:
            print(f"| {r['block']} | {r['n_blocks']} | {r['recall']:.3f} |")
    else:
        rows = []
        for depth in args.depths:
            for cell in args.cells:
                cmd = [sys.executable, __file__, "--one", f"{cell}:{depth}", "--n-local", str(args.n_local),
                       "--n-batch", str(args.n_batch), "--n-decode", str(args.n_decode), "--threads",
                       str(args.threads)] + (["--model", args.model] if args.model else [])
                rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
                print(rows[-1], file=sys.stderr, flush=True)
        base = {r["depth"]: r["decode_ms"] for r in rows if r["cell"] == "lminf"}
        pre = {r["depth"]: r["prefill_tok_s"] for r in rows if r["cell"] == "lminf"}
        rss = {r["depth"]: r["hwm_mb"] for r in rows if r["cell"] == "lminf"}
        print("| depth | cell | flash | decode ms | vs lminf | prefill tok/s | vs lminf | peak RSS MB | vs lminf "
              "| anon MB | store B/token | store MB | store on disk MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ratio = r["decode_ms"] / base[r["depth"]] if r["depth"] in base else float("nan")
            flash = "on" if r["flash_attn"] else "off"
            nan = float("nan")
            print(f"| {r['depth']} | {r['cell']} | {flash} | {r['decode_ms']:.1f} | {ratio:.2f}x "
                  f"| {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / pre.get(r['depth'], nan):.2f}x "
                  f"| {r['hwm_mb']:.0f} | {r['hwm_mb'] / rss.get(r['depth'], nan):.2f}x | {r['anon_mb']:.0f} "
                  f"| {r['store_bytes_per_token']} | {r['store_mb']:.0f} | {r['disk_mb']:.0f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))


if __name__ == "__main__":
    main()
