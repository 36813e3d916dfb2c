"""Evaluation helpers on short inputs: position buckets, CSV, plots, passkey prompts and scoring."""

from __future__ import annotations

import csv
import random
import re

import numpy as np
import pytest

from lminf_gguf import evaluate


def test_buckets_are_powers_of_two_and_cover_every_position():
    assert evaluate.buckets(1) == [(1, 2)]
    assert evaluate.buckets(10) == [(1, 2), (2, 4), (4, 8), (8, 11)]
    covered = [p for lo, hi in evaluate.buckets(1000) for p in range(lo, hi)]
    assert covered == list(range(1, 1001))


def test_bucket_perplexity_means():
    nll = np.array([1.0, 2.0, 4.0, 0.0, 0.0, 0.0, 0.0])  # positions 1..7
    rows = evaluate.bucket_perplexity(nll)
    assert [(r["lo"], r["hi"], r["tokens"]) for r in rows] == [(1, 2, 1), (2, 4, 2), (4, 8, 4)]
    assert rows[1]["mean_nll"] == pytest.approx(3.0)
    assert rows[1]["ppl"] == pytest.approx(np.exp(3.0))


def test_csv_and_plot_written(tmp_path):
    series = {"lminf": np.linspace(3, 2, 300), "vanilla": np.linspace(3, 5, 300)}
    evaluate.write_csv(tmp_path / "ppl.csv", series)
    with open(tmp_path / "ppl.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["mode", "lo", "hi", "tokens", "mean_nll", "ppl"]
    assert {r["mode"] for r in rows} == {"lminf", "vanilla"}
    assert sum(int(r["tokens"]) for r in rows if r["mode"] == "lminf") == 300
    evaluate.plot_nll(str(tmp_path / "ppl.png"), series)
    assert (tmp_path / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evaluate.plot_passkey(str(tmp_path / "pk.png"), {(100, 0.0): 1.0, (100, 1.0): 0.5, (200, 0.0): 0.0,
                                                     (200, 1.0): 1.0})
    assert (tmp_path / "pk.png").stat().st_size > 1000


def _words(text):
    return text.split()


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_places_the_key(depth):
    case = evaluate.passkey_case(_words, 2000, depth, random.Random(1))
    assert len(case.key) == 5 and case.key.isdigit()
    assert abs(len(_words(case.prompt)) - 2000) < 40
    where = case.prompt.index(f"The pass key is {case.key}") / len(case.prompt)
    assert abs(where - depth) < 0.05
    assert case.prompt.endswith(evaluate.PASSKEY_QUESTION)


def test_passkey_cases_are_seeded():
    a = evaluate.passkey_case(_words, 500, 0.3, random.Random(7))
    b = evaluate.passkey_case(_words, 500, 0.3, random.Random(7))
    assert a == b


def test_passkey_scoring():
    assert evaluate.passkey_correct(" 12345. Remember", "12345")
    assert not evaluate.passkey_correct(" 1234 5", "12345")
    assert not evaluate.passkey_correct(" I do not know", "12345")
    assert not evaluate.passkey_correct(" 123456", "12345")


def test_passkey_grid_reports_every_case():
    class KeyEcho:  # answers with the first 5-digit number of the prompt, except at depth 1
        tokenize = staticmethod(_words)

        def generate(self, prompt, max_tokens, temperature):
            m = re.search(r"\d{5}", prompt)
            return " 00000" if prompt.index(m.group(0)) > len(prompt) - 400 else f" {m.group(0)}."

    seen = []
    table = evaluate.passkey_grid(KeyEcho(), [300, 600], [0.0, 1.0], trials=2, seed=3,
                                  on_case=lambda n, d, case, answer, ok: seen.append((n, d, ok, case.key in answer)))
    assert len(seen) == 8 and all(ok == has_key for _, _, ok, has_key in seen)
    assert table == {(300, 0.0): 1.0, (300, 1.0): 0.0, (600, 0.0): 1.0, (600, 1.0): 0.0}


# -- on the default model: the shift baseline and the two commands, on short inputs ---------------------------

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import lminf_gguf  # noqa: E402
from conftest import needs_default_model as needs_default, rel_err  # noqa: E402

PROSE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
         "want of a wife. However little known the feelings or views of such a man may be on his first entering "
         "a neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 12


@needs_default
def test_shift_mode_is_vanilla_until_full_then_shifts_within_budget():
    kw = dict(n_global=4, n_local=128, n_batch=32, flash_attn=False, n_threads=2)
    shift = lminf_gguf.LMInfinite(mode="shift", **kw)
    vanilla = lminf_gguf.LMInfinite(mode="vanilla", n_ctx=2048, **{k: v for k, v in kw.items()
                                                                   if k not in ("n_global", "n_local")})
    tokens = shift.tokenize(PROSE)[:600]
    a, b = shift.nll(tokens), vanilla.nll(tokens)
    n_ctx = shift.cache_info()["cells_total"]
    assert rel_err(a[: n_ctx - 40], b[: n_ctx - 40]) < 1e-6   # before the first shift: the same computation
    assert shift.cache_info()["shifts"] >= 1 and shift.cache_info()["cells_used"] <= n_ctx
    assert np.isfinite(a).all()


def _lminf(*args):
    exe = Path(sys.executable).with_name("lminf")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, cwd="/")


@needs_default
def test_perplexity_command(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(PROSE)
    res = _lminf("perplexity", "-f", str(text), "--mode", "lminf", "lminf-topk", "shift", "--n-local", "128",
                 "-b", "64", "--max-tokens", "400", "-t", "2", "--csv", str(tmp_path / "p.csv"),
                 "--plot", str(tmp_path / "p.png"))
    assert res.returncode == 0, res.stderr
    # every mode under one flash-attention setting (auto: what llama.cpp chose for the first), top-k included
    lines = [line for line in res.stdout.splitlines() if ": 400 tokens" in line]
    assert [line.split(":")[0] for line in lines] == ["lminf", "lminf-topk", "shift"], res.stdout
    assert len({line.rsplit("flash attention", 1)[1] for line in lines}) == 1, res.stdout
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["mode"] for r in rows} == {"lminf", "lminf-topk", "shift"}
    assert sum(int(r["tokens"]) for r in rows if r["mode"] == "lminf") == 399
    assert (tmp_path / "p.png").stat().st_size > 1000


@needs_default
def test_passkey_command(tmp_path):
    res = _lminf("passkey", "--lengths", "200", "--depths", "0", "1", "--trials", "1", "--n-local", "128",
                 "-t", "2", "--csv", str(tmp_path / "k.csv"))
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "k.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["tokens"], r["depth"]) for r in rows] == [("lminf", "200", "0.0"), ("lminf", "200", "1.0")]
    assert all(float(r["accuracy"]) in (0.0, 1.0) for r in rows)
    # one progress line per prompt on stderr (a 64K-token prompt takes minutes)
    lines = [line for line in res.stderr.splitlines() if line.startswith("lminf: 200 tokens")]
    assert len(lines) == 2 and all(("found" in line) != ("missed" in line) for line in lines), res.stderr
