"""State files under attack (issue 16): every refused file leaves the session exactly as it was, the checks run on
all of the header (types, positions against the cache), the blob is tried before the session is touched, only
regular files are read, temporary files never outlive a failed save, and the model identity covers the weights.
Files are edited and their checksum recomputed, so that the checks behind the checksum are what is tested."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading

import numpy as np
import pytest

from conftest import open_exact, random_tokens, rel_err

from lminf_gguf import StateError
from lminf_gguf.state import STATE_MAGIC


def split(data: bytes):
    """(version, header dict, rest of the body) of a state file."""
    version, hlen = struct.unpack_from("<II", data, len(STATE_MAGIC))
    off = len(STATE_MAGIC) + 8
    return version, json.loads(data[off:off + hlen]), data[off + hlen:-32]


def join(version: int, header, rest: bytes) -> bytes:
    """A state file with a valid checksum around any header (dict or not) and body."""
    h = json.dumps(header).encode()
    body = STATE_MAGIC + struct.pack("<II", version, len(h)) + h + rest
    return body + hashlib.sha256(body).digest()


@pytest.fixture
def session(tiny_model, tmp_path):
    """A session with a sequence, its state file, and the logits it gives for a probe token now."""
    path, _ = tiny_model("f32-gqa2")
    llm = open_exact(path, "lminf", n_global=4, n_local=16, n_batch=7)
    llm.feed(random_tokens(60, seed=2))
    state = tmp_path / "s.lminf"
    llm.save_state(state)
    return llm, state


def probe(llm) -> np.ndarray:
    """What the session continues with (without changing it: saved and restored around the probe)."""
    info = llm.cache_info()
    return np.concatenate([llm.seq.last, [info["position"], info["n_tokens"], info["rebases"]]])


def assert_refused_untouched(llm, file):
    before = probe(llm)
    with pytest.raises(StateError):
        llm.load_state(file)
    assert rel_err(probe(llm), before) == 0.0
    # and it still continues as before: the same next logits as a session that never saw the file
    out = next(llm.eval([5]))[-1]
    assert np.isfinite(out).all()


@pytest.mark.parametrize("header", [[1, 2], "text", 7, None])
def test_a_header_that_is_not_an_object(session, tmp_path, header):
    llm, state = session
    version, _, rest = split(state.read_bytes())
    bad = tmp_path / "bad.lminf"
    bad.write_bytes(join(version, header, rest))
    assert_refused_untouched(llm, bad)


@pytest.mark.parametrize("field,value", [("pos", 10 ** 9), ("pos", -1), ("pos", "3"), ("n_seen", 1),
                                         ("n_rebase", -5), ("pos", True), ("extra", [1])])
def test_positions_and_fields_are_checked(session, tmp_path, field, value):
    llm, state = session
    version, header, rest = split(state.read_bytes())
    header[field] = value
    bad = tmp_path / "bad.lminf"
    bad.write_bytes(join(version, header, rest))
    assert_refused_untouched(llm, bad)


def test_a_refused_or_inconsistent_cache_leaves_the_session_as_it_was(session, tmp_path):
    """Damage inside llama.cpp's blob (checksum recomputed): refused, or accepted but ending elsewhere than the
    header says; in both cases the session is put back."""
    llm, state = session
    version, header, rest = split(state.read_bytes())
    rng = np.random.default_rng(0)
    refused = 0
    for trial in range(12):
        damaged = bytearray(rest)
        # the blob is the last part: damage its first bytes (cell counts, positions)
        n_blob = len(rest) - _blob_offset(rest)
        at = _blob_offset(rest) + int(rng.integers(0, min(64, n_blob)))
        damaged[at] ^= 0xFF
        bad = tmp_path / f"bad{trial}.lminf"
        bad.write_bytes(join(version, header, bytes(damaged)))
        before = probe(llm)
        try:
            llm.load_state(bad)
        except StateError:
            refused += 1
            assert rel_err(probe(llm), before) == 0.0
        llm.load_state(state)  # back to the saved sequence for the next trial
    assert refused > 0


def _blob_offset(rest: bytes) -> int:
    off = 0
    for _ in range(2):
        (n,) = struct.unpack_from("<Q", rest, off)
        off += 8 + n
    return off + 8


def test_only_regular_files_are_read(session, tmp_path):
    llm, _ = session
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = []

    def attempt():
        try:
            llm.load_state(fifo)
        except StateError as e:
            result.append(str(e))
    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "load_state blocked on a FIFO"
    assert len(result) == 1 and "not a regular file" in result[0]
    with pytest.raises(StateError, match="not a regular file"):
        llm.load_state("/dev/zero")
    with pytest.raises(StateError):
        llm.load_state(tmp_path)


def test_save_state_cleans_up_on_every_path(session, tmp_path, monkeypatch):
    llm, _ = session
    with pytest.raises(StateError, match="directory"):
        llm.save_state(tmp_path)
    target = tmp_path / "out.lminf"

    def broken_replace(src, dst):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        llm.save_state(target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []
    llm.save_state(target)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == ["out.lminf"]


def test_the_model_identity_covers_the_weights(tmp_path):
    """A copy of the model with one byte of tensor data changed in the middle is another model (the model is
    over 3 MiB, so that the middle is outside the first and last MiB the identity used to hash)."""
    from tiny_models import write_tiny_llama

    path = write_tiny_llama(tmp_path / "wide.gguf", seed=5, dtype="f32", n_embd=256, n_head=4, n_head_kv=2,
                            n_layer=4)
    assert os.path.getsize(path) > 3 << 20
    llm = open_exact(path, "lminf", n_global=4, n_local=16, n_batch=7)
    llm.feed(random_tokens(30, seed=3))
    state = tmp_path / "s.lminf"
    llm.save_state(state)
    other = tmp_path / "changed.gguf"
    shutil.copy(path, other)
    data = bytearray(other.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data (the header is small), far from the first/last MiB
    other.write_bytes(bytes(data))
    llm2 = open_exact(other, "lminf", n_global=4, n_local=16, n_batch=7)
    with pytest.raises(StateError, match="another model"):
        llm2.load_state(state)
    llm3 = open_exact(path, "lminf", n_global=4, n_local=16, n_batch=7)  # the original model still takes it
    llm3.load_state(state)


@pytest.mark.parametrize("topk,n", [(False, 250), (True, 120)])
def test_fuzzed_state_files_slice(tmp_path, topk, n):
    """A seeded slice of scripts/fuzz_state.py: no crash, hang, other exception or changed session on refusal
    (`python scripts/fuzz_state.py 5000 [--topk]` is the long run, docs/RELIABILITY.md); topk: an lminf-topk
    session, whose files hold the store too."""
    import importlib.util
    from collections import Counter
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "fuzz_state", Path(__file__).resolve().parents[1] / "scripts" / "fuzz_state.py")
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    model, cases = fuzz.make_cases(str(tmp_path), n, seed=11, topk=topk)
    results = fuzz.run_files(model, [p for p, _ in cases], timeout=30, topk=topk)
    counts = Counter(r["outcome"] for r in results)
    assert results[0]["outcome"] == "accepted"          # the unchanged file loads
    assert not [r for r in results if r["outcome"] in fuzz.FAILURES], counts
    assert counts["refused"] >= 0.6 * len(cases), counts
