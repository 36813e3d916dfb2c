"""Hostile inputs on the default model: odd bytes through nll(path=), generate() and `lminf generate -f`, and
corrupted state files. Behaviour: invalid UTF-8 is replaced (U+FFFD), NUL and special-token text are plain text
(nll/generate parse no special tokens in user text), an empty file is a ValueError ("nll needs at least two
tokens") and exit code 2 with one line in the CLI; nothing crashes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import lminf_gguf
from conftest import needs_default_model

pytestmark = needs_default_model

INPUTS = {
    "invalid-utf8": b"caf\xc3 \xff\xfe\x80\x80 ok \xed\xa0\x80 end\n" * 20,
    "nul": b"abc\x00\x00def\x00" * 50,
    "binary": bytes(range(256)) * 8,
    "special-text": b"<|im_start|><|im_end|><|endoftext|>" * 20,
    "long-line": (b"word " * 400_000)[:2_000_000],   # one 2 MB line (scripts: larger)
    "empty": b"",
}


@pytest.fixture(scope="module")
def llm():
    return lminf_gguf.LMInfinite(n_local=128, n_batch=64, n_threads=2)


@pytest.mark.parametrize("name", [n for n in INPUTS if n != "long-line"])
def test_nll_and_generate(llm, tmp_path, name):
    p = tmp_path / f"{name}.txt"
    p.write_bytes(INPUTS[name])
    if name == "empty":
        with pytest.raises(ValueError, match="at least two tokens"):
            llm.nll(path=p)
        with pytest.raises(ValueError, match="empty prompt"):
            llm.generate("", max_tokens=4)
        return
    nll = llm.nll(path=p)
    assert len(nll) > 0 and (nll >= 0).all()
    out = llm.generate(INPUTS[name].decode("utf-8", errors="replace"), max_tokens=4, temperature=0)
    assert isinstance(out, str)


def test_long_line_nll(llm, tmp_path):
    p = tmp_path / "line.txt"
    p.write_bytes(INPUTS["long-line"][:20_000])   # tokenised whole; evaluating it costs ~4k tokens
    assert len(llm.nll(path=p)) > 1_000


@pytest.mark.parametrize("name", ["invalid-utf8", "nul", "binary", "special-text", "empty"])
def test_cli_generate(tmp_path, name):
    p = tmp_path / f"{name}.txt"
    p.write_bytes(INPUTS[name])
    res = subprocess.run([sys.executable, "-m", "lminf_gguf.cli", "generate", "-f", str(p), "-n", "4",
                          "--n-local", "128", "--temp", "0"], capture_output=True, text=True, timeout=300,
                         cwd=str(tmp_path))
    assert res.returncode in (0, 2), res.stderr[-2000:]
    if res.returncode == 2:
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_state_file_byte_flips_and_huge_lengths(llm, tmp_path):
    llm.reset()
    llm.feed("The history of the printing press begins")
    good = tmp_path / "good.lminf"
    llm.save_state(good)
    data = good.read_bytes()
    before = llm.cache_info()
    want = llm.generate("", fresh=False, max_tokens=4, temperature=0)
    llm.load_state(good)
    import random
    import struct
    rng = random.Random(0)
    bad = []
    for k in range(60):   # flips at many offsets: magic, version, header, lengths, logits, blob, digest
        buf = bytearray(data)
        off = rng.randrange(len(data)) if k >= 12 else min(k * 3, len(data) - 1)
        buf[off] ^= 1 << rng.randrange(8)
        bad.append(bytes(buf))
    for v in (1 << 31, (1 << 32) - 1):   # absurd declared header length
        buf = bytearray(data)
        struct.pack_into("<I", buf, 12, v)
        bad.append(bytes(buf))
    for i, blob in enumerate(bad):
        f = tmp_path / f"bad{i}.lminf"
        f.write_bytes(blob)
        with pytest.raises(lminf_gguf.StateError):
            llm.load_state(f)
        assert llm.cache_info() == before
    # another mode / G / L
    other = lminf_gguf.LMInfinite(n_local=64, n_global=4, mode="mask", n_batch=64, n_threads=2)
    other.feed("Hello there")
    other.save_state(tmp_path / "other.lminf")
    with pytest.raises(lminf_gguf.StateError, match="other settings"):
        llm.load_state(tmp_path / "other.lminf")
    assert llm.generate("", fresh=False, max_tokens=4, temperature=0) == want
