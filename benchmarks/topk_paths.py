#!/usr/bin/env python3
"""lminf-topk on the default model: both flash-attention paths of the corrected rows against the float64 reference.

On the CPU, flash attention returns each row's log-sum-exp and the middle tokens merge with it (patches 0007/0019);
topk_fa_lse=False (the C parameter llama_lminf_topk_params.fa_lse) forces the older path, a second pass over K for
the row's scores (what GPUs run). The
tiny models of tests/test_topk.py never reach ggml's split-KV decode kernel (it takes n_kv >= 512) nor its tiled
kernel in a corrected row (ubatches of 64 rows or more); the default model at L = 600 reaches both: ubatches of 1
(decode, split-KV) and of 512 (prefill, tiled). Each engine path runs in its own process, over held-out text, with an f16 cache and an f32 store, k = 5 from layer 4 at distance L/2; the non-flash
path is the third row. Figures: relative error of the logits at the corrected rows that have middle tokens, against
tests/reference.py (float64 PyTorch, the same top-k rows).

On this model the engine is about 2e-2 from the reference in every mode (the Q4_1 weights against q8_0
activations: a tiny difference moves an activation across a rounding step, and 30 layers amplify it; see
docs/EXACTNESS.md), so two exact paths differ from each other by about as much as from the reference: the test
here is that neither is further from it than the non-flash path. The tight comparisons are on the tiny models.

    python benchmarks/topk_paths.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import austen_path  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import sys, json, numpy as np, lminf_gguf
tokens = np.load(sys.argv[1]); kw = json.loads(sys.argv[3])
llm = lminf_gguf.LMInfinite(None, mode="lminf-topk", type_k="f16", type_v="f16", store_type="f32", **kw)
np.save(sys.argv[2], llm.logits(tokens))
"""


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--n-global", type=int, default=10)
    ap.add_argument("--n-local", type=int, default=600, help="at least 512, for the split-KV kernel")
    ap.add_argument("--decode-tokens", type=int, default=900, help="stream for ubatches of 1")
    ap.add_argument("--prefill-tokens", type=int, default=1700, help="stream for ubatches of 512")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from reference import TopK, load_gguf

    import lminf_gguf

    path = lminf_gguf.default_model_path()
    G, L = args.n_global, args.n_local
    with open(austen_path(), encoding="utf-8") as f:
        text = f.read()[-400_000:]
    llm = lminf_gguf.LMInfinite(path, n_local=256, n_threads=1)
    all_tokens = np.asarray(llm.tokenize(text)[:max(args.decode_tokens, args.prefill_tokens)])
    llm.close()
    ref = load_gguf(path)

    print(f"lminf-topk, default model, G = {G}, L = {L}, k = 5 from layer 4 at L/2, f16 cache, f32 store, "
          f"{args.threads} threads")
    print("| ubatch | kernel | tokens | corrected rows | flash, log-sum-exp | flash, second pass "
          "| non-flash |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n_batch, kernel, n in ((1, "split-KV", args.decode_tokens), (512, "tiled", args.prefill_tokens)):
            tokens = all_tokens[:n]
            np.save(os.path.join(tmp, "tokens.npy"), tokens)
            last = [min(n, c + n_batch) - 1 for c in range(0, n, n_batch)]
            t0 = time.time()
            want = np.asarray(ref.logits(tokens, mode="lminf", n_global=G, n_local=L, dist_max=L,
                                         topk=TopK(5, 4, L // 2, last)), dtype=np.float64)
            rows = [i for i in last if i >= G + L + 8]  # rows with middle tokens to choose from
            errs = []
            for flash, lse in ((True, True), (True, False), (False, True)):
                out = os.path.join(tmp, "out.npy")
                kw = dict(n_global=G, n_local=L, dist_max=L, n_batch=n_batch, flash_attn=flash, n_threads=args.threads,
                          topk=5, topk_layer=4, topk_dist=L // 2, topk_fa_lse=lse)
                subprocess.run([sys.executable, "-c", _CHILD, os.path.join(tmp, "tokens.npy"), out, json.dumps(kw)],
                               cwd=tmp, check=True, capture_output=True)
                errs.append(rel(np.load(out).astype(np.float64)[rows], want[rows]))
            print(f"| {n_batch} | {kernel} | {n} | {len(rows)} | {errs[0]:.2e} | {errs[1]:.2e} | {errs[2]:.2e} |",
                  flush=True)
            print(f"(reference: {time.time() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
