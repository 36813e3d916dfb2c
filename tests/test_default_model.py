"""End to end on the offline default model (SmolLM2-135M-Instruct Q4_1): LM-Infinite equals vanilla inside the
window, streams beyond the trained context stay bounded, the CLI prints continuations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import N_GPU_LAYERS, rel_err, needs_default_model

import lminf_gguf

pytestmark = needs_default_model

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
        "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
        "considered the rightful property of some one or other of their daughters. ")


def _open(mode, **kw):
    return lminf_gguf.LMInfinite(mode=mode, flash_attn=False, n_threads=2, n_gpu_layers=N_GPU_LAYERS, **kw)


@pytest.mark.parametrize("n_local", [None, 256])
def test_lminf_equals_vanilla_inside_the_window(n_local):
    vanilla = _open("vanilla", n_ctx=1024)
    tokens = vanilla.tokenize(TEXT * 3)[:250]
    want = vanilla.logits(tokens)
    got = _open("lminf", n_local=n_local).logits(tokens)
    assert rel_err(got, want) <= 1e-6
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_defaults_from_the_model():
    llm = _open("lminf")
    assert (llm.n_global, llm.n_local, llm.dist_max) == (10, 8192, 8192)
    assert llm.cache_info()["cells_total"] == 10 + 8192 + 512


def test_long_stream_small_window_is_bounded_and_sane():
    llm = _open("lminf", n_local=128, n_batch=64)
    tokens = llm.tokenize(TEXT * 40)
    assert len(tokens) > 2500
    nll = llm.nll(tokens)
    info = llm.cache_info()
    assert info["cells_used"] <= info["cells_bound"] == 10 + 128 + 64
    assert info["rebases"] > 0
    assert np.isfinite(nll).all()
    # repeated text becomes predictable once a copy sits inside the window: far better than chance
    assert nll[-500:].mean() < 1.0 < np.log(llm.n_vocab)


def test_vanilla_refuses_to_overflow():
    llm = _open("vanilla", n_ctx=256)
    with pytest.raises(lminf_gguf.ContextFullError):
        llm.logits(llm.tokenize(TEXT * 10))


def test_greedy_generation_is_deterministic():
    llm = _open("lminf", n_local=512)
    a = llm.generate(TEXT, max_tokens=16, temperature=0)
    b = llm.generate(TEXT, max_tokens=16, temperature=0)
    assert a == b and len(a.strip()) > 0
    assert "\x00" not in a
    c = llm.generate(TEXT, max_tokens=16, temperature=0.9, seed=7)
    d = "".join(llm.generate(TEXT, max_tokens=16, temperature=0.9, seed=7, stream=True))
    assert c == d


def _lminf(*args, **kw):
    exe = Path(sys.executable).with_name("lminf")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, cwd="/", **kw)


def test_cli_generate_from_file(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(TEXT * 30)
    res = _lminf("generate", "-f", str(book), "-n", "12", "--temp", "0", "--n-local", "256", "-t", "2")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip()) > 0


def test_progress_of_a_small_file_counts_tokens_consumed(tmp_path):
    """The whole of a small file is read at once; the progress must still follow the tokens evaluated (it used to
    read 100 % from the first batch)."""
    book = tmp_path / "book.txt"
    book.write_text(TEXT * 8)
    seen = []
    n = _open("lminf", n_local=256, n_batch=32).feed(book, progress=lambda done, frac: seen.append((done, frac)))
    fractions = [f for _, f in seen]
    assert len(seen) == -(-n // 32) and seen[-1][0] == n
    assert fractions[0] < 0.2 and fractions[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(fractions, fractions[1:]))


def test_cli_progress_summary_when_stderr_is_not_a_terminal(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(TEXT * 30)
    res = _lminf("generate", "-f", str(book), "-n", "2", "--temp", "0", "--n-local", "256", "-t", "2")
    assert res.returncode == 0, res.stderr
    assert "prompt: " in res.stderr and " tokens in " in res.stderr and "tokens/s" in res.stderr


def test_cli_warns_about_ignored_flags():
    res = _lminf("generate", "-p", "Hello", "-n", "1", "-c", "512", "--topk", "3", "-t", "1", "--n-local", "64")
    assert res.returncode == 0, res.stderr
    assert "-c/--ctx-size" in res.stderr and "--topk" in res.stderr and "ignored" in res.stderr


def test_cli_help_shows_every_default():
    res = _lminf("generate", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for flag, default in (("--top-k", "40"), ("--top-p", "0.95"), ("--min-p", "0.05"), ("--repeat-penalty", "1.0"),
                          ("--batch-size", "512"), ("--temp", "0.8"), ("--flash-attn", "auto")):
        assert flag in text and f"default {default}" in text, (flag, default)


def test_cli_version():
    res = _lminf("--version")
    assert res.returncode == 0 and res.stdout.startswith("lminf ") and "0.3.36" in res.stdout


def test_cli_info():
    res = _lminf("info")
    assert res.returncode == 0, res.stderr
    fields = dict(line.split(":", 1) for line in res.stdout.splitlines() if ":" in line)
    assert fields["architecture"].split()[0] == "llama"
    assert fields["trained context"].strip() == "8192"
    assert fields["LM-Infinite"].strip() == "supported"


@pytest.mark.parametrize("args", [["generate", "-p", "hi", "-m", "/nonexistent.gguf"],
                                  ["generate", "-p", "hi", "--n-local", "0"],
                                  ["generate", "-p", ""]])
def test_cli_errors_are_one_line(args):
    res = _lminf(*args)
    assert res.returncode == 2
    assert res.stderr.startswith("lminf: error:") and "Traceback" not in res.stderr
