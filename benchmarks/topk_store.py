#!/usr/bin/env python3
"""lminf-topk's middle-token store: its size per token by store type, and resident memory against disk use as the
stream grows, with the store in memory and memory-mapped in a directory (store_dir).

1. bytes (default): LMInfinite.topk_store_bytes_per_token() for each model and store type (f16, q8_0, q4_0).
2. --rss: one child process per cell feeds `--tokens` tokens of Austen in chunks and, at each checkpoint, reads
   its own /proc/self/status (VmRSS, RssAnon, RssFile, RssShmem, VmHWM), cache_info()["store_bytes"], and the
   disk blocks of its store files. The files in store_dir are unlinked (and closed) as soon as they are mapped,
   so `du` never sees them: the disk use is read from the blocks allocated to the "(deleted)" files in store_dir
   that the process maps (/proc/self/maps, st_blocks * 512 through /proc/self/map_files).

    python benchmarks/topk_store.py --models default /tmp/qwen.gguf
    python benchmarks/topk_store.py --rss --tokens 4096 8192 16384 --store-dir /tmp/lminf_store --threads 2

Run it alone (nothing else on the CPU); the figures are memory and bytes, not timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import austen_path  # benchmarks/common.py

STORE_TYPES = ("f16", "q8_0", "q4_0")
RSS_CELLS = {  # name -> LMInfinite keyword arguments; "{dir}" is replaced by --store-dir
    "lminf": dict(mode="lminf"),
    "topk f16, memory": dict(mode="lminf-topk"),
    "topk f16, store_dir": dict(mode="lminf-topk", store_dir="{dir}"),
    "topk q4_0, store_dir": dict(mode="lminf-topk", store_type="q4_0", store_dir="{dir}"),
}


def status_kb() -> dict:
    keys = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name = line.split(":")[0]
            if name in keys:
                out[name] = int(line.split()[1])
    return out


def store_disk_bytes(store_dir: str | None) -> int:
    """Blocks allocated to this process's mapped, unlinked files in store_dir (the memory-mapped store segments;
    the engine closes each file once mapped, so they are found in /proc/self/maps, and stat'ed through
    /proc/self/map_files)."""
    if not store_dir:
        return 0
    real = os.path.realpath(store_dir)
    seen, total = set(), 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith(real + "/") and parts[5].rstrip().endswith("(deleted)"):
                try:
                    st = os.stat(f"/proc/self/map_files/{parts[0]}")
                except OSError:
                    continue
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_blocks * 512
    return total


def store_resident_kb(store_dir: str | None) -> int:
    """Resident kB of this process's mappings of store files (/proc/self/smaps): the part of VmRSS that is the
    memory-mapped store (file pages the kernel may write back and drop under memory pressure)."""
    if not store_dir:
        return 0
    real, total, inside = os.path.realpath(store_dir), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[5].startswith(real + "/")
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


def one_rss(args) -> dict:
    from lminf_gguf import LMInfinite

    kw = {k: (v.format(dir=args.store_dir) if isinstance(v, str) else v) for k, v in RSS_CELLS[args.cell].items()}
    if kw.get("store_dir"):
        Path(kw["store_dir"]).mkdir(parents=True, exist_ok=True)
    model = None if args.model in (None, "default") else args.model
    llm = LMInfinite(model, n_global=10, n_local=args.n_local, n_batch=args.n_batch, n_threads=args.threads, **kw)
    n_max = max(args.tokens)
    text = Path(austen_path()).read_text(encoding="utf-8")
    tokens = llm.tokenize(text[: n_max * 8])[:n_max]
    assert len(tokens) == n_max, len(tokens)
    rows, fed, t0 = [], 0, time.perf_counter()
    rows.append(dict(tokens=0, **status_kb()))
    for stop in sorted(args.tokens):
        for _ in llm.eval(tokens[fed:stop]):
            pass
        fed = stop
        info = llm.cache_info()
        rows.append(dict(tokens=stop, **status_kb(), store_bytes=info.get("store_bytes", 0),
                         store_rows=info.get("store_rows", 0), disk_bytes=store_disk_bytes(kw.get("store_dir")),
                         store_rss_kb=store_resident_kb(kw.get("store_dir")),
                         cells_used=info["cells_used"], wall_s=round(time.perf_counter() - t0, 1)))
    bpt = llm.topk_store_bytes_per_token() if llm.mode == "lminf-topk" else 0
    llm.close()
    return dict(cell=args.cell, model=args.model or "default", store_bytes_per_token=bpt, rows=rows)


def store_bytes(models) -> list:
    from lminf_gguf import LMInfinite

    out = []
    for m in models:
        for st in STORE_TYPES:
            llm = LMInfinite(None if m == "default" else m, mode="lminf-topk", n_local=256, n_batch=256,
                             n_threads=1, store_type=st)
            out.append(dict(model=m, store_type=st, bytes_per_token=llm.topk_store_bytes_per_token()))
            llm.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["default"], help="'default' or GGUF paths (bytes per token)")
    ap.add_argument("--rss", action="store_true", help="measure resident memory and disk use as the stream grows")
    ap.add_argument("--model", default="default", help="--rss: the model")
    ap.add_argument("--cells", nargs="+", default=list(RSS_CELLS), choices=list(RSS_CELLS))
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384], help="--rss: checkpoints")
    ap.add_argument("--store-dir", default="/tmp/lminf_store")
    ap.add_argument("--n-local", type=int, default=256)
    ap.add_argument("--n-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one --rss cell, print JSON
    args = ap.parse_args()

    if args.one:
        args.cell = args.one
        print(json.dumps(one_rss(args)))
        return
    if not args.rss:
        rows = store_bytes(args.models)
        print("| model | store type | bytes per token | GB per 10^6 tokens |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['store_type']} | {r['bytes_per_token']:,} | "
                  f"{r['bytes_per_token'] * 1e6 / 1e9:.2f} GB |")
    else:
        rows = []
        for cell in args.cells:
            cmd = [sys.executable, __file__, "--one", cell, "--model", args.model, "--store-dir", args.store_dir,
                   "--n-local", str(args.n_local), "--n-batch", str(args.n_batch), "--threads", str(args.threads),
                   "--tokens", *map(str, args.tokens)]
            rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        print("| cell | tokens | VmRSS MB | RssAnon MB | RssFile+Shmem MB | of which the mapped store MB "
              "| store MB allocated (cache_info) | store on disk MB |\n|---|---|---|---|---|---|---|---|")
        for cell in rows:
            for r in cell["rows"][1:]:
                print(f"| {cell['cell']} | {r['tokens']:,} | {r['VmRSS'] / 1024:.0f} | {r['RssAnon'] / 1024:.0f} | "
                      f"{(r['RssFile'] + r['RssShmem']) / 1024:.0f} | {r['store_rss_kb'] / 1024:.0f} | "
                      f"{r['store_bytes'] / 2**20:.0f} | "
                      f"{r['disk_bytes'] / 2**20:.0f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))


if __name__ == "__main__":
    main()
