#!/usr/bin/env python3
"""Passkey retrieval in the official LM-Infinite format, by mode and distance: the mode x length table of issue 23.

The prompt (as the official repository's passkey data builds it): the task description, the distractor sentence
"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." repeated and joined by
spaces, the key sentence "The pass key is K. Remember it. K is the pass key." inserted at a random place among
them (depths spread over the whole input, seeded), then " What is the pass key? The pass key is". K is a random
integer in [1, 10^7). Raw completion (no chat template), greedy, 8 tokens; found = the first number is K.

--haystack austen: the same key sentence and question in natural text instead of the repeated distractor: a
passage of Jane Austen's novels (scripts/fetch_data.py austen) from a random line on, the key sentence between two
of its lines at a random depth (a needle in natural text, where nothing marks the key as the odd sentence out).

Lengths are multiples of the window L (--times 2 4 8: 2L, 4L, 8L tokens). vanilla holds the whole prompt (n_ctx =
the longest length + 64). Time alone, with an explicit --threads: the seconds are wall-clock per cell.

    python scripts/passkey_eval.py -m qwen2.5-coder-0.5b --n-local 256 --times 2 4 8 --trials 4 --threads 1
    python scripts/passkey_eval.py --haystack austen --modes lminf-topk lminf shift --n-local 256 --times 16 --threads 2
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

from lminf_gguf.options import STORE_TYPES, TOPK

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
DISTRACTOR = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MODES = ("lminf-topk", "lminf", "shift", "vanilla")


def prompt(tokenize, n_tokens: int, rng: random.Random, depth=None):
    """(prompt of about n_tokens tokens, key, tokens from the key sentence to the end). depth: the share of the
    distractors before the key (None: drawn at random)."""
    key = rng.randint(1, 10**7 - 1)
    per = len(tokenize(" ".join([DISTRACTOR] * 16))) / 16
    fixed = len(tokenize(" ".join([TASK, NEEDLE.format(key=key), QUESTION])))
    n = max(1, round((n_tokens - fixed) / per))
    before = rng.randint(0, n) if depth is None else round(depth * n)
    text = " ".join([TASK] + [DISTRACTOR] * before + [NEEDLE.format(key=key)] + [DISTRACTOR] * (n - before)
                    + [QUESTION])
    back = len(tokenize(" ".join([NEEDLE.format(key=key)] + [DISTRACTOR] * (n - before) + [QUESTION])))
    return text, key, back


def austen_prompt(tokenize, n_tokens: int, rng: random.Random, lines: list, depth=None):
    """The prompt() of --haystack austen: Austen's lines from a random one on as the haystack."""
    key = rng.randint(1, 10**7 - 1)
    needle = NEEDLE.format(key=key)
    fixed = len(tokenize(" ".join([TASK, needle, QUESTION])))
    start = rng.randrange(len(lines) // 2)
    hay, n = [], 0
    for line in lines[start:]:
        if n >= n_tokens - fixed:
            break
        hay.append(line)
        n += len(tokenize(" " + line))
    if n < n_tokens - fixed:
        sys.exit(f"--haystack austen: the text holds {n:,} tokens from line {start}, fewer than {n_tokens:,}")
    at = rng.randint(0, len(hay)) if depth is None else round(depth * len(hay))
    text = " ".join([TASK] + hay[:at] + [needle] + hay[at:] + [QUESTION])
    back = len(tokenize(" ".join([needle] + hay[at:] + [QUESTION])))
    return text, key, back


class Progress:
    """generate()'s progress(done, total): one line per 5 % of the prompt, with the rate so far."""

    def __init__(self, t0: float):
        self.t0, self.next = t0, 0.05

    def __call__(self, done: int, total: int):
        if total and done / total >= self.next:
            dt = time.perf_counter() - self.t0
            print(f"  {done:,} / {total:,} prompt tokens, {dt:.0f} s ({done / dt:.0f} tok/s)", file=sys.stderr,
                  flush=True)
            self.next = done / total + 0.05


def resources(llm, t0: float, store_dir) -> str:
    """Seconds since t0, the process's peak and anonymous resident memory, the top-k store's size (allocated
    segments) and, with store_dir, its blocks on disk."""
    kb = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "RssAnon"):
                kb[name] = int(rest.split()[0])
    info = llm.cache_info()
    out = (f"{time.perf_counter() - t0:.0f} s, peak RSS {kb['VmHWM'] / 1024:,.0f} MB (anon now "
           f"{kb['RssAnon'] / 1024:,.0f} MB)")
    if info.get("store_bytes"):
        out += f", store {info['store_bytes'] / 2**20:,.0f} MB allocated"
    if store_dir:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
        from topk_store import store_disk_bytes  # benchmarks/topk_store.py
        out += f", {store_disk_bytes(store_dir) / 2**20:,.0f} MB on disk"
    return out


def found(answer: str, key: int) -> bool:
    m = re.search(r"\d+", answer)
    return m is not None and int(m.group(0)) == key


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--n-local", type=int, default=1024, help="window L (default 1024)")
    ap.add_argument("--n-global", type=int, default=10, help="sinks G (default 10)")
    ap.add_argument("--times", type=int, nargs="+", default=[2, 4, 8], help="lengths as multiples of L")
    ap.add_argument("--trials", type=int, default=4, help="prompts per cell (default 4)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, required=True, help="CPU threads (explicit: time alone)")
    ap.add_argument("--topk", type=int, default=TOPK.k, help=f"lminf-topk: middle tokens per KV head ({TOPK.k})")
    ap.add_argument("--topk-layer", type=int, default=TOPK.layer_first,
                    help=f"lminf-topk: first layer that picks them ({TOPK.layer_first})")
    ap.add_argument("--topk-block", type=int, default=TOPK.block,
                    help="lminf-topk block index: keys per block (0, the default: exact scan)")
    ap.add_argument("--topk-blocks", type=int, default=TOPK.n_blocks,
                    help="lminf-topk block index: blocks scanned per segment")
    ap.add_argument("--n-batch", type=int, default=None, help="tokens per llama_decode call (default min(512, L))")
    ap.add_argument("--topk-tail", type=int, default=TOPK.tail,
                    help=f"lminf-topk: a prompt's last tokens decoded one at a time ({TOPK.tail})")
    ap.add_argument("--topk-dist", type=int, default=None, help="lminf-topk: distance of the middle tokens (L/2)")
    ap.add_argument("--topk-units", type=int, default=TOPK.n_units,
                    help="lminf-topk block index: of those, blocks attended whole in stream order (0: single keys)")
    ap.add_argument("--store-type", default=TOPK.store_type, choices=list(STORE_TYPES),
                    help="lminf-topk store type")
    ap.add_argument("--store-dir", default=None, help="lminf-topk: memory-map the store in this directory")
    ap.add_argument("--haystack", default="repeat", choices=("repeat", "austen"),
                    help="repeat: the official distractor sentence (default); austen: natural text")
    ap.add_argument("--depth", type=float, default=None,
                    help="share of the haystack before the key, in [0, 1] (default: random per prompt)")
    ap.add_argument("--progress", action="store_true",
                    help="report the prompt's evaluation every 5 %% (long prompts)")
    args = ap.parse_args(argv)
    if args.depth is not None and not 0.0 <= args.depth <= 1.0:
        ap.error("--depth is a share of the haystack, in [0, 1]")

    make_prompt = prompt
    if args.haystack == "austen":
        import subprocess
        path = subprocess.run([sys.executable, str(Path(__file__).with_name("fetch_data.py")), "austen"],
                              capture_output=True, text=True, check=True).stdout.strip()
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]

        def make_prompt(tokenize, n, rng, depth):
            return austen_prompt(tokenize, n, rng, lines, depth)

    from lminf_gguf import LMInfinite
    from lminf_gguf.errors import InvalidInputError

    lengths = [t * args.n_local for t in args.times]
    rows = {}
    for mode in args.modes:
        kw = dict(n_ctx=max(lengths) + 64) if mode == "vanilla" else dict(n_local=args.n_local,
                                                                          n_global=args.n_global)
        if mode == "lminf-topk":
            kw.update(topk=args.topk, topk_layer=args.topk_layer, topk_block=args.topk_block, topk_blocks=args.topk_blocks,
                      topk_units=args.topk_units, topk_dist=args.topk_dist, topk_tail=args.topk_tail,
                      store_type=args.store_type,
                      store_dir=args.store_dir)
        try:
            llm = LMInfinite(args.model, mode=mode, n_batch=args.n_batch or min(512, args.n_local), n_threads=args.threads, **kw)
        except (InvalidInputError, FileNotFoundError) as e:
            ap.error(str(e))
        for times, n in zip(args.times, lengths):
            rng = random.Random(f"{args.seed}-{n}")   # the same prompts for every mode
            ok, far, t0 = 0, 0, time.perf_counter()
            for _ in range(args.trials):
                text, key, back = make_prompt(llm.tokenize, n, rng, args.depth)
                t1 = time.perf_counter()
                answer = llm.generate(text, max_tokens=8, temperature=0,
                                      progress=Progress(time.perf_counter()) if args.progress else None)
                ok += found(answer, key)
                far += back > args.n_local
                print(f"{mode} {times}x: key {key} {back:,} tokens back: {answer.strip()[:40]!r} "
                      f"({'found' if found(answer, key) else 'missed'}); {resources(llm, t1, args.store_dir)}",
                      file=sys.stderr, flush=True)
            rows[(mode, times)] = (ok, time.perf_counter() - t0, far)
        llm.close()

    index = f"block index {args.topk_block}x{args.topk_blocks}" if args.topk_block else "exact scan"
    if args.topk_units:
        index += f", {args.topk_units} memory units"
    if args.topk_dist:
        index += f", topk_dist {args.topk_dist}"
    if args.topk_tail:
        index += f", last {args.topk_tail} prompt tokens one at a time"
    fmt = "official format" if args.haystack == "repeat" else "key sentence in Austen's text"
    print(f"passkey, {fmt}, {args.model}, G = {args.n_global}, L = {args.n_local}, "
          f"lminf-topk: k {args.topk} from layer {args.topk_layer}, {index}, "
          f"{args.store_type} store; {args.trials} prompts per "
          f"cell, {args.threads} thread(s): found / prompts (of which k had the key behind the window; seconds for "
          "the cell)")
    print("| mode | " + " | ".join(f"{n:,} ({t}x L)" for t, n in zip(args.times, lengths)) + " |")
    print("|---|" + "---|" * len(lengths))
    for mode in args.modes:
        cells = [f"{rows[(mode, t)][0]}/{args.trials} ({rows[(mode, t)][2]} behind; {rows[(mode, t)][1]:.0f} s)"
                 for t in args.times]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
