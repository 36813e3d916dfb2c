"""Evaluation helpers on short inputs: position buckets, CSV, plots, passkey prompts and scoring."""

from __future__ import annotations

import csv
import random

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
