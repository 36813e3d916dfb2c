"""State files of lminf-topk sessions (patch 0016): the middle-token store is saved with the cache, a session
restored from the file continues exactly as the reference does over the whole stream, and a refused file leaves
the session as it was (also when the refusal comes after the cache was restored)."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from conftest import random_tokens, rel_err
from test_topk import EXACT, L, open_topk, reference

import lminf_gguf
from lminf_gguf import StateError, state
from lminf_gguf.state import STATE_MAGIC

N_BATCH = 7
PREFIX = 7 * N_BATCH * 2   # 98 tokens, six windows and some rebases; a multiple of n_batch, so that the ubatches of a
TAIL = 3 * L + 2           # restored session fall where the reference's do


def sections(data: bytes):
    """(version, header, [logits, text, ids, sequence, store]) of a state file."""
    version, hlen = struct.unpack_from("<II", data, len(STATE_MAGIC))
    off = len(STATE_MAGIC) + 8
    header = json.loads(data[off:off + hlen])
    off += hlen
    parts = []
    while off < len(data) - 32:
        (n,) = struct.unpack_from("<Q", data, off)
        parts.append(data[off + 8:off + 8 + n])
        off += 8 + n
    return version, header, parts


def join(version, header, parts) -> bytes:
    h = json.dumps(header).encode()
    body = STATE_MAGIC + struct.pack("<II", version, len(h)) + h + b"".join(struct.pack("<Q", len(p)) + p
                                                                             for p in parts)
    return body + hashlib.sha256(body).digest()


def tail_logits(llm, tokens) -> np.ndarray:
    return np.concatenate([b.copy() for b in llm.eval(tokens, all_logits=True)])


@pytest.mark.parametrize("store", [dict(), dict(topk_block=4, topk_blocks=1, store_segment=16), dict(store_dir=True)],
                         ids=["exact-scan", "block-index", "mapped"])
def test_a_restored_topk_session_continues_as_the_reference(tiny_model, tmp_path, store):
    path, ref = tiny_model("f32-gqa2")
    if store.get("store_dir"):
        store = dict(store_dir=tmp_path)
    tokens = random_tokens(PREFIX + TAIL, seed=5).tolist()
    index = dict(block=4, n_blocks=1, seg_rows=16) if "topk_block" in store else {}
    want = reference(ref, tokens, n_batch=N_BATCH, **index)
    a = open_topk(path, n_batch=N_BATCH, **store)
    a.feed(tokens[:PREFIX])
    file = tmp_path / "s.lminf"
    size = a.save_state(file)
    rows = a.cache_info()["store_rows"]
    assert rows == PREFIX and size > rows * a.topk_store_bytes_per_token()
    b = open_topk(path, n_batch=N_BATCH, **store)
    b.feed(random_tokens(30, seed=9).tolist())  # a sequence of its own, replaced by the file's
    b.load_state(file)
    assert b.cache_info()["store_rows"] == rows and b.cache_info()["position"] == a.cache_info()["position"]
    got_b = tail_logits(b, tokens[PREFIX:])
    got_a = tail_logits(a, tokens[PREFIX:])   # the saved session goes on as the restored one
    assert rel_err(got_b, got_a) == 0.0
    err = rel_err(got_b, want[PREFIX:])
    assert err <= EXACT, f"relative error {err:.2e}"
    # the guard: the middle tokens matter here (the same stream without them, mode lminf, is far off)
    plain = lminf_gguf.LMInfinite(path, mode="lminf", n_global=4, n_local=L, dist_max=L, type_k="f32", type_v="f32",
                                  n_batch=N_BATCH, n_threads=2, flash_attn=False)
    assert rel_err(plain.logits(tokens)[PREFIX:], want[PREFIX:]) > 100 * EXACT


@pytest.fixture
def saved(tiny_model, tmp_path):
    """An lminf-topk session with a sequence of its own, a state file of another one, and a probe."""
    path, _ = tiny_model("f32-gqa2")
    other = open_topk(path, n_batch=N_BATCH)
    other.feed(random_tokens(PREFIX, seed=3).tolist())
    file = tmp_path / "s.lminf"
    other.save_state(file)
    llm = open_topk(path, n_batch=N_BATCH)
    llm.feed(random_tokens(60, seed=4).tolist())
    return path, llm, file


def continuation(llm, tmp_path):
    """What the session gives next, and it left as it was (saved and restored around the probe)."""
    info = llm.cache_info()
    llm.save_state(tmp_path / "probe.lminf")
    out = tail_logits(llm, random_tokens(2 * L, seed=8).tolist())
    llm.load_state(tmp_path / "probe.lminf")
    return np.concatenate([out.ravel(), [info["position"], info["n_tokens"], info["store_rows"]]])


def assert_refused_untouched(llm, file, tmp_path, match=None):
    before = continuation(llm, tmp_path)
    with pytest.raises(StateError, match=match):
        llm.load_state(file)
    assert rel_err(continuation(llm, tmp_path), before) == 0.0


def _store_header(store: bytes) -> list:
    return list(struct.unpack_from("<6q", store))


@pytest.mark.parametrize("field,value,match", [
    (0, 1, "malformed top-k store"),           # rows: the size no longer matches
    (1, -3, "malformed top-k store"),          # a negative row offset
    (1, 0, "for a stream of"),                 # an offset that disagrees with the cache (which was rebased)
    (2, 1, "cannot take"),                     # another store type (f16 for f32) (checked in llama.cpp: state_check)
    (3, 2, "layers"),                          # another first layer
    (5, 7, "bytes a row"),
])
def test_a_store_of_another_shape_is_refused(saved, tmp_path, field, value, match):
    path, llm, file = saved
    version, header, parts = sections(file.read_bytes())
    hdr = _store_header(parts[4])
    hdr[field] = value if field != 0 else hdr[0] + value
    parts[4] = struct.pack("<6q", *hdr) + parts[4][48:]
    bad = tmp_path / "bad.lminf"
    bad.write_bytes(join(version, header, parts))
    assert_refused_untouched(llm, bad, tmp_path, match)


def test_missing_or_foreign_stores_are_refused(saved, tmp_path):
    path, llm, file = saved
    version, header, parts = sections(file.read_bytes())
    nan = parts[4][:48] + struct.pack("<f", float("nan")) + parts[4][52:]
    for store, match in ((b"", "no top-k store"), (parts[4][:40], "truncated top-k store"),
                         (parts[4][:-1], "malformed top-k store"), (nan, "not finite")):
        bad = tmp_path / "bad.lminf"
        bad.write_bytes(join(version, header, parts[:4] + [store]))
        assert_refused_untouched(llm, bad, tmp_path, match)
    # a file of an lminf session: other settings
    plain = lminf_gguf.LMInfinite(path, mode="lminf", n_global=4, n_local=L, dist_max=L, type_k="f32", type_v="f32",
                                  n_batch=N_BATCH, n_threads=2)
    plain.feed(random_tokens(40, seed=1).tolist())
    plain.save_state(tmp_path / "plain.lminf")
    assert_refused_untouched(llm, tmp_path / "plain.lminf", tmp_path, "other settings")
    # and the top-k file into the lminf session, with its settings edited to match: a store it has no place for
    version, header, parts = sections(file.read_bytes())
    header.update(state.settings(plain))
    (tmp_path / "edited.lminf").write_bytes(join(version, header, parts))
    with pytest.raises(StateError, match="top-k store in a session without one"):
        plain.load_state(tmp_path / "edited.lminf")


def test_a_store_refused_after_the_cache_is_restored_puts_both_back(saved, tmp_path, monkeypatch):
    """The store goes in after the cache (restoring the cache truncates the store): if it failed there, the
    session's own cache and store come back."""
    path, llm, file = saved
    real = state._set_store
    calls = []

    def failing_once(session, store):
        calls.append(len(store))
        return False if len(calls) == 1 else real(session, store)

    before = continuation(llm, tmp_path)
    monkeypatch.setattr(state, "_set_store", failing_once)
    with pytest.raises(StateError, match="as it was"):
        llm.load_state(file)
    monkeypatch.setattr(state, "_set_store", real)
    assert len(calls) == 2 and rel_err(continuation(llm, tmp_path), before) == 0.0
    llm.load_state(file)  # and the file itself is fine
    assert llm.cache_info()["store_rows"] == PREFIX
