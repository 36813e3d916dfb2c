"""Evaluation: perplexity by position over long streams, and passkey retrieval.

Perplexity buckets are powers of two of the position of the predicted token: [1, 2), [2, 4), ..., so that a
model that collapses past its trained context shows it in one row. Passkey retrieval is the standard task
(Mohtashami & Jaggi 2023, used by the LM-Infinite paper): a random 5-digit key hidden at a chosen depth of
repetitive filler text, asked for at the end, answered greedily.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def buckets(n_positions: int) -> list[tuple[int, int]]:
    """Power-of-two position buckets [lo, hi) covering positions 1 .. n_positions."""
    out, lo = [], 1
    while lo <= n_positions:
        out.append((lo, min(2 * lo, n_positions + 1)))
        lo *= 2
    return out


def bucket_perplexity(nll: np.ndarray) -> list[dict]:
    """Rows {lo, hi, tokens, mean_nll, ppl}; nll[i] is the loss of the token at position i + 1."""
    rows = []
    for lo, hi in buckets(len(nll)):
        part = np.asarray(nll[lo - 1:hi - 1], dtype=np.float64)
        mean = float(part.mean())
        rows.append(dict(lo=lo, hi=hi, tokens=len(part), mean_nll=mean, ppl=float(np.exp(mean))))
    return rows


def write_csv(path: str, series: dict[str, np.ndarray]) -> None:
    """One row per (mode, bucket): mode, lo, hi, tokens, mean_nll, ppl."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mode", "lo", "hi", "tokens", "mean_nll", "ppl"])
        for mode, nll in series.items():
            for r in bucket_perplexity(nll):
                w.writerow([mode, r["lo"], r["hi"], r["tokens"], f"{r['mean_nll']:.6f}", f"{r['ppl']:.4f}"])


def plot_nll(path: str, series: dict[str, np.ndarray], title: str = "") -> None:
    """NLL against position (log x axis, bucket means), one line per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for mode, nll in series.items():
        rows = bucket_perplexity(nll)
        ax.plot([np.sqrt(r["lo"] * r["hi"]) for r in rows], [r["mean_nll"] for r in rows], marker="o", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position")
    ax.set_ylabel("mean NLL (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@dataclass
class PasskeyCase:
    prompt: str
    key: str
    n_filler: int
    depth: float


def passkey_case(tokenize: Callable[[str], Sequence[int]], n_tokens: int, depth: float, rng: random.Random
                 ) -> PasskeyCase:
    """A prompt of about n_tokens tokens with a 5-digit key at relative depth (0 = start, 1 = end)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError("depth must be in [0, 1]")
    key = str(rng.randint(10000, 99999))
    needle = PASSKEY_NEEDLE.format(key=key)
    fixed = len(tokenize(PASSKEY_INTRO + needle + PASSKEY_QUESTION))
    per_filler = len(tokenize(PASSKEY_FILLER * 8)) / 8
    n_filler = max(1, round((n_tokens - fixed) / per_filler))
    before = round(n_filler * depth)
    prompt = PASSKEY_INTRO + PASSKEY_FILLER * before + needle + PASSKEY_FILLER * (n_filler - before) + PASSKEY_QUESTION
    return PasskeyCase(prompt, key, n_filler, depth)


def passkey_correct(answer: str, key: str) -> bool:
    """The first number in the answer is the key."""
    m = re.search(r"\d+", answer)
    return m is not None and m.group(0) == key


def passkey_grid(llm, lengths: Sequence[int], depths: Sequence[float], trials: int = 5, seed: int = 0,
                 on_case: Optional[Callable[[int, float, PasskeyCase, str, bool], None]] = None) -> dict:
    """Accuracy per (length, depth) with greedy answers of up to 8 tokens; seeded. on_case(length, depth, case,
    answer, correct) is called after each prompt (long prompts take minutes)."""
    rng = random.Random(seed)
    table = {}
    for n in lengths:
        for d in depths:
            ok = 0
            for _ in range(trials):
                case = passkey_case(llm.tokenize, n, d, rng)
                answer = llm.generate(case.prompt, max_tokens=8, temperature=0)
                correct = passkey_correct(answer, case.key)
                ok += correct
                if on_case:
                    on_case(n, d, case, answer, correct)
            table[(n, d)] = ok / trials
    return table


def plot_passkey(path: str, table: dict, title: str = "") -> None:
    """Heatmap of accuracy: lengths on x, depths on y."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({n for n, _ in table})
    depths = sorted({d for _, d in table})
    grid = np.array([[table[(n, d)] for n in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(lengths), 1 + 0.5 * len(depths)), dpi=100)
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("depth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
