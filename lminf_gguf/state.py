"""State files: a session's sequence (bounded KV cache, position bookkeeping, last logits, chat text) saved to a
file and restored in any process with the same model and settings. LMInfinite.save_state/load_state call these."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
from typing import Optional, Union

import numpy as np

from ._lib import llama_raw
from .errors import StateError
from .options import MODES

STATE_MAGIC = b"LMINFST\x00"
STATE_VERSION = 1


def model_id(llm) -> str:
    """Identity of the model file stored in state files: its size and a sha256 of its first and last MiB."""
    if llm._model_id is None:
        h = hashlib.sha256()
        size = os.path.getsize(llm.model_path)
        with open(llm.model_path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
        llm._model_id = f"{size}:{h.hexdigest()}"
    return llm._model_id


def settings(llm) -> dict:
    return {"mode": llm.mode, "n_global": llm.n_global, "n_local": llm.n_local,
            "dist_max": llm.dist_max, "type_k": llm.type_k, "type_v": llm.type_v, "n_vocab": llm.n_vocab}


def save_state(llm, path: Union[str, os.PathLike], extra: Optional[dict] = None) -> int:
    """Write the sequence (the bounded KV cache, the position bookkeeping, the last logits and the text the
    chat API tracks) to a file; return its size in bytes. extra: any JSON-serialisable dict, given back by
    load_state.

    The live cache is re-laid out as load_state lays it out, so that this session and one restored from
    the file continue identically.

    Format: STATE_MAGIC, u32 version, u32 header length, JSON header (model path and id, mode, G, L, C,
    KV types, positions, n_seen, ...), then the last logits row, the tracked text and llama.cpp's
    llama_state_seq_get_data() blob (each preceded by its u64 length), then a sha256 of all that.
    """
    if MODES[llm.mode].topk:
        raise StateError("save_state is not supported in lminf-topk mode: the middle-token store is not saved")
    size = llama_raw.llama_state_seq_get_size(llm.ctx, 0)
    blob = (ctypes.c_uint8 * max(size, 1))()
    n = llama_raw.llama_state_seq_get_data(llm.ctx, blob, size, 0)
    if size and n == 0:
        raise RuntimeError("llama.cpp could not serialise the sequence")
    # lay the live cache out as load_state will (the cells compacted in order): attention sums run over the
    # cells in cache order, and with quantised weights rounding differences grow, so without this a session
    # continued after save_state could drift from one restored from the file
    if n and llama_raw.llama_state_seq_set_data(llm.ctx, blob, n, 0) == 0:
        llm.reset()
        raise RuntimeError("llama.cpp could not re-read the sequence it saved; the session was reset")
    c = llm._cache
    header = dict(settings(llm), format="lminf_gguf state", model_path=llm.model_path,
                  model_id=model_id(llm), pos=c.pos, n_seen=c.n_seen, n_rebase=c.n_rebase,
                  rebase_at=c.rebase_at, has_logits=llm._last is not None,
                  has_text=llm._text is not None, extra=extra or {})
    hjson = json.dumps(header).encode()
    logits = llm._last.astype("<f4").tobytes() if llm._last is not None else b""
    text = bytes(llm._text) if llm._text is not None else b""
    body = b"".join([STATE_MAGIC, struct.pack("<II", STATE_VERSION, len(hjson)), hjson,
                     struct.pack("<Q", len(logits)), logits, struct.pack("<Q", len(text)), text,
                     struct.pack("<Q", n), ctypes.string_at(blob, n)])
    digest = hashlib.sha256(body).digest()
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(body)
        f.write(digest)
    os.replace(tmp, path)
    return len(body) + len(digest)


def load_state(llm, path: Union[str, os.PathLike]) -> dict:
    """Restore a sequence written by save_state (any process, same model and settings); return its extra.

    The file is checked whole before the session is touched: a file that is not a state file, corrupt,
    truncated, or from another model or other settings raises StateError and leaves the session as it was.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise StateError(f"cannot read state file {path}: {e.strerror or e}") from None
    if not data.startswith(STATE_MAGIC):
        raise StateError(f"{path} is not an lminf_gguf state file (bad magic)")
    if len(data) < len(STATE_MAGIC) + 8 + 32:
        raise StateError(f"{path}: truncated state file")
    version, hlen = struct.unpack_from("<II", data, len(STATE_MAGIC))
    if version != STATE_VERSION:
        raise StateError(f"{path}: state file version {version}, this lminf_gguf reads version "
                         f"{STATE_VERSION}")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise StateError(f"{path}: corrupt or truncated state file (checksum mismatch)")
    try:
        off = len(STATE_MAGIC) + 8
        header = json.loads(body[off:off + hlen])
        off += hlen
        parts = []
        for _ in range(3):
            (n,) = struct.unpack_from("<Q", body, off)
            parts.append(body[off + 8:off + 8 + n])
            off += 8 + n
        if off != len(body):
            raise ValueError("trailing bytes")
    except (ValueError, struct.error) as e:
        raise StateError(f"{path}: malformed state file ({e})") from None
    logits, text, blob = parts
    if header.get("model_id") != model_id(llm):
        raise StateError(f"{path} was saved with another model ({header.get('model_path')}); this "
                         f"session runs {llm.model_path}")
    mine = settings(llm)
    diff = [f"{k} {header.get(k)!r} (session: {v!r})" for k, v in mine.items() if header.get(k) != v]
    if diff:
        raise StateError(f"{path} was saved with other settings: {', '.join(diff)}")
    if not MODES[llm.mode].bounded and header["pos"] > llm._cache.n_ctx:
        raise StateError(f"{path} holds {header['pos']} positions, more than n_ctx = {llm._cache.n_ctx}")
    if len(logits) != (4 * llm.n_vocab if header.get("has_logits") else 0):
        raise StateError(f"{path}: malformed state file (logits size)")

    llm.reset()
    if blob:
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if llama_raw.llama_state_seq_set_data(llm.ctx, buf, len(blob), 0) == 0:
            llm.reset()
            raise StateError(f"{path}: llama.cpp refused the saved cache; the session was reset to an "
                             "empty sequence")
    c = llm._cache
    c.pos, c.n_seen, c.n_rebase = int(header["pos"]), int(header["n_seen"]), int(header["n_rebase"])
    llm._last = np.frombuffer(logits, dtype="<f4").astype(np.float32) if logits else None
    llm._text = bytearray(text) if header.get("has_text") else None
    return header.get("extra") or {}
