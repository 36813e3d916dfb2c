"""State files: a session's sequence (bounded KV cache, position bookkeeping, last logits, chat text) saved to a
file and restored in any process with the same model and settings. LMInfinite.save_state/load_state call these."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import stat
import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np

from . import _lib
from ._lib import llama_raw
from .context import in_use
from .errors import StateError
from .files import temp_next_to
from .options import MODES

STATE_MAGIC = b"LMINFST\x00"
STATE_VERSION = 4  # 2: the model identity hashes the whole file; 3: the chat text's token ids (prefix reuse);
# 4: the top-k store (lminf-topk sessions; empty otherwise)
_VERSIONS = {2: 3, 3: 4, 4: 5}  # version: sections after the header (2: logits, text, sequence; 3: + token ids;
# 4: + store)
_STORE_HEADER = struct.Struct("<6q")  # the store state's header (patch 0016): rows, row offset, type, first layer,
# layers, row bytes

# a state file is read whole: anything larger than this is not one of ours (a bounded cache of a large model and
# its logits stay far below; a top-k session's store grows with its stream: about 800K tokens of SmolLM2-135M at
# f16 fit)
MAX_STATE_BYTES = 16 << 30

_ids: dict = {}  # (path, size, mtime_ns) -> identity: each model file is hashed once per process


def model_id(llm) -> str:
    """Identity of the model file stored in state files: its size and a BLAKE2b digest of all its bytes (weights
    included), computed once per file and process (about 1 s per GB)."""
    st = os.stat(llm.model_path)
    key = (os.path.realpath(llm.model_path), st.st_size, st.st_mtime_ns)
    if key not in _ids:
        h = hashlib.blake2b(digest_size=32)
        with open(llm.model_path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _ids[key] = f"{st.st_size}:{h.hexdigest()}"
    return _ids[key]


def _read_state_file(path: str) -> bytes:
    """The bytes of a regular state file; StateError for anything else (a FIFO would block, /dev/zero never end)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise StateError(f"cannot read state file {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StateError(f"{path} is not a regular file")
    if st.st_size > MAX_STATE_BYTES:
        raise StateError(f"{path} is {st.st_size} bytes, larger than any state file ({MAX_STATE_BYTES})")
    try:
        with open(path, "rb") as f:
            # the size stat() saw (+1 to notice a file that grew): read(huge) would reserve that much memory first
            return f.read(st.st_size + 1)
    except OSError as e:
        raise StateError(f"cannot read state file {path}: {e.strerror or e}") from None


def settings(llm) -> dict:
    out = {"mode": llm.mode, "n_global": llm.n_global, "n_local": llm.n_local,
           "dist_max": llm.dist_max, "type_k": llm.type_k, "type_v": llm.type_v, "n_vocab": llm.n_vocab}
    if MODES[llm.mode].topk:
        out.update(topk=llm.topk, topk_layer=llm.topk_layer, topk_dist=llm.topk_dist, store_type=llm.store_type)
    return out


def _store_state(llm) -> bytes:
    """The top-k store's rows and bookkeeping (b"" outside lminf-topk): a copy, n_rows * row_bytes + 48 bytes."""
    if not MODES[llm.mode].topk:
        return b""
    size = _lib.llama_lminf_topk_state_size(llm.ctx)
    buf = ctypes.create_string_buffer(size)
    if _lib.llama_lminf_topk_state_get(llm.ctx, buf, size) != size:
        raise RuntimeError("llama.cpp could not serialise the top-k store")
    return buf.raw


def _set_store(llm, store: bytes) -> bool:
    """Put a store state (from _store_state, or a checked file) into the session's store."""
    return not store or bool(_lib.llama_lminf_topk_state_set(llm.ctx, store, len(store)))


def _check_store(llm, store: bytes, pos: int, n_seen: int) -> Optional[str]:
    """Why a file's store section cannot go into this session (None: it can; its segments are then allocated).
    pos, n_seen: the file's cache position and stream length, which the store's rows must agree with."""
    if not MODES[llm.mode].topk:
        return "a top-k store in a session without one" if store else None
    if len(store) < _STORE_HEADER.size:
        return "no top-k store in the file" if not store else "a truncated top-k store"
    rows, offset, _, layer_first, n_layer, row_bytes = _STORE_HEADER.unpack_from(store)
    mine = _lib.llama_lminf_topk_row_bytes(llm.ctx)
    if layer_first != llm.topk_layer or n_layer != llm.model.n_layer or row_bytes != mine:
        return (f"a top-k store of layers {layer_first}..{n_layer - 1} with {row_bytes} bytes a row (session: "
                f"layers {llm.topk_layer}..{llm.model.n_layer - 1}, {mine} bytes)")
    if rows < 0 or offset < 0 or len(store) != _STORE_HEADER.size + rows * row_bytes:
        return "a malformed top-k store (rows or size)"
    # a row per token of the stream, and cache position p at row p + offset: a store that disagrees with the cache
    # would be read at rows it does not hold
    if rows != n_seen or offset != n_seen - pos:
        return f"a top-k store of {rows} rows at offset {offset} for a stream of {n_seen} tokens at position {pos}"
    if llm.store_type in ("f32", "f16"):
        values = np.frombuffer(store, dtype="<f4" if llm.store_type == "f32" else "<f2", offset=_STORE_HEADER.size)
        if not np.isfinite(values).all():
            return "a top-k store with keys or values that are not finite"
    if _lib.llama_lminf_topk_state_check(llm.ctx, store, len(store)) != rows:
        return "a top-k store this session's store cannot take (" + \
               "; ".join(_lib.last_errors()[-1:]) + ")"
    return None


def save_state(llm, path: Union[str, os.PathLike], extra: Optional[dict] = None) -> int:
    """Write the sequence (the bounded KV cache, the position bookkeeping, the last logits and the text the
    chat API tracks) to a file; return its size in bytes. extra: any JSON-serialisable dict, given back by
    load_state.

    The live cache is re-laid out as load_state lays it out, so that this session and one restored from
    the file continue identically.

    Format: STATE_MAGIC, u32 version, u32 header length, JSON header (model path and id, mode, G, L, C,
    KV types, positions, n_seen, ...), then the last logits row, the tracked text, its token ids, llama.cpp's
    llama_state_seq_get_data() blob and the top-k store (lminf-topk: every token's key and value in the top-k
    layers, n_seen * topk_store_bytes_per_token() bytes, copied; empty otherwise), each preceded by its u64
    length, then a sha256 of all that.
    """
    if os.path.isdir(path):
        raise StateError(f"{os.fspath(path)} is a directory")
    llm.model.check_servers()
    store = _store_state(llm)  # before the re-layout below, which truncates the store
    size = llama_raw.llama_state_seq_get_size(llm.ctx, 0)
    blob = (ctypes.c_uint8 * max(size, 1))()
    n = llama_raw.llama_state_seq_get_data(llm.ctx, blob, size, 0)
    llm.model.check_servers()  # a cache on an RPC server that went away reads as zeros: no file of them
    if size and n == 0:
        raise RuntimeError("llama.cpp could not serialise the sequence")
    # lay the live cache out as load_state will (the cells compacted in order): attention sums run over the
    # cells in cache order, and with quantised weights rounding differences grow, so without this a session
    # continued after save_state could drift from one restored from the file
    if n and (llama_raw.llama_state_seq_set_data(llm.ctx, blob, n, 0) == 0 or not _set_store(llm, store)):
        llm.reset()
        raise RuntimeError("llama.cpp could not re-read the sequence it saved; the session was reset")
    seq, c = llm.seq, llm.seq.cache
    header = dict(settings(llm), format="lminf_gguf state", model_path=llm.model_path,
                  model_id=model_id(llm), pos=c.pos, n_seen=c.n_seen, n_rebase=c.n_rebase,
                  rebase_at=c.rebase_at, has_logits=seq.last is not None,
                  has_text=seq.text is not None, extra=extra or {})
    hjson = json.dumps(header).encode()
    logits = seq.last.astype("<f4").tobytes() if seq.last is not None else b""
    text = bytes(seq.text) if seq.text is not None else b""
    ids = np.asarray(seq.tokens if seq.text is not None else [], dtype="<i4").tobytes()
    body = b"".join([STATE_MAGIC, struct.pack("<II", STATE_VERSION, len(hjson)), hjson,
                     struct.pack("<Q", len(logits)), logits, struct.pack("<Q", len(text)), text,
                     struct.pack("<Q", len(ids)), ids, struct.pack("<Q", n), ctypes.string_at(blob, n),
                     struct.pack("<Q", len(store)), store])
    digest = hashlib.sha256(body).digest()
    # a temporary file next to the target, renamed over it when complete, removed on every failure
    target = os.path.abspath(os.fspath(path))
    tmp = temp_next_to(Path(target), "state")
    try:
        with open(tmp, "wb") as f:
            f.write(body)
            f.write(digest)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(body) + len(digest)


def load_state(llm, path: Union[str, os.PathLike]) -> dict:
    """Restore a sequence written by save_state (any process, same model and settings); return its extra.

    The file is checked whole before the session is touched: a file that is not a state file, corrupt,
    truncated, or from another model or other settings raises StateError and leaves the session as it was.
    """
    path = os.fspath(path)
    data = _read_state_file(path)
    if not data.startswith(STATE_MAGIC):
        raise StateError(f"{path} is not an lminf_gguf state file (bad magic)")
    if len(data) < len(STATE_MAGIC) + 8 + 32:
        raise StateError(f"{path}: truncated state file")
    version, hlen = struct.unpack_from("<II", data, len(STATE_MAGIC))
    if version not in _VERSIONS:
        raise StateError(f"{path}: state file version {version}, this lminf_gguf reads version "
                         f"{STATE_VERSION}")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise StateError(f"{path}: corrupt or truncated state file (checksum mismatch)")
    try:
        off = len(STATE_MAGIC) + 8
        header = json.loads(body[off:off + hlen])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        off += hlen
        parts = []
        for _ in range(_VERSIONS[version]):
            (n,) = struct.unpack_from("<Q", body, off)
            parts.append(body[off + 8:off + 8 + n])
            off += 8 + n
        if off != len(body):
            raise ValueError("trailing bytes")
    except (ValueError, struct.error, RecursionError, OverflowError) as e:
        raise StateError(f"{path}: malformed state file ({e})") from None
    parts += [b""] * (5 - len(parts))  # older versions: no store; version 2: no token ids either
    logits, text, ids, blob, store = parts if version > 2 else (parts[0], parts[1], None, parts[2], b"")
    if ids is not None and len(ids) % 4:
        raise StateError(f"{path}: malformed state file (token ids)")
    tokens = None if ids is None else np.frombuffer(ids, dtype="<i4").tolist()
    if tokens is not None and any(not 0 <= t < llm.n_vocab for t in tokens):
        raise StateError(f"{path}: malformed state file (token ids outside the vocabulary)")
    if header.get("model_id") != model_id(llm):
        raise StateError(f"{path} was saved with another model ({header.get('model_path')}); this "
                         f"session runs {llm.model_path}")
    mine = settings(llm)
    diff = [f"{k} {header.get(k)!r} (session: {v!r})" for k, v in mine.items() if header.get(k) != v]
    if diff:
        raise StateError(f"{path} was saved with other settings: {', '.join(diff)}")
    seq, c = llm.seq, llm.seq.cache
    pos, n_seen, n_rebase = (header.get(k) for k in ("pos", "n_seen", "n_rebase"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (pos, n_seen, n_rebase)):
        raise StateError(f"{path}: malformed state file (positions)")
    limit = c.rebase_at if MODES[llm.mode].bounded else c.n_ctx
    if pos > limit or n_seen < pos or n_seen >= 2**62:
        raise StateError(f"{path} holds position {pos} of {n_seen} tokens: this session's cache takes positions up "
                         f"to {limit}")
    if len(logits) != (4 * llm.n_vocab if header.get("has_logits") else 0):
        raise StateError(f"{path}: malformed state file (logits size)")
    if logits and not np.isfinite(np.frombuffer(logits, dtype="<f4")).all():
        raise StateError(f"{path}: malformed state file (logits that are not finite)")
    if not isinstance(header.get("extra", {}), dict):
        raise StateError(f"{path}: malformed state file (extra is not an object)")

    why = _check_store(llm, store, pos, n_seen)
    if why:
        raise StateError(f"{path} holds {why}")

    # the session is touched only if the whole file is accepted: its own sequence (and store) is kept to be put back
    llm.model.check_servers()
    backup = _sequence(llm)
    try:
        _restore(llm, blob, pos)
        if not _set_store(llm, store):  # checked above, so this does not fail but for a bug: still, put it back
            raise StateError("llama.cpp refused the saved top-k store")
    except StateError as e:
        _restore(llm, backup[0])
        _set_store(llm, backup[-1])
        c.pos, c.n_seen, c.n_rebase, seq.last, seq.text, seq.tokens = backup[1:-1]
        raise StateError(f"{path}: {e}; the session is as it was") from None
    llm.model.check_servers()
    c.pos, c.n_seen, c.n_rebase = pos, n_seen, n_rebase
    seq.last = np.frombuffer(logits, dtype="<f4").astype(np.float32) if logits else None
    # a version 2 file has no token ids: its chat text cannot be reused token for token (the next chat starts afresh)
    has_text = bool(header.get("has_text")) and tokens is not None
    seq.text, seq.tokens = (bytearray(text), tokens) if has_text else (None, None)
    return header.get("extra") or {}


def _sequence(llm) -> tuple:
    """The live sequence: (llama.cpp's blob, pos, n_seen, n_rebase, last logits, text, its token ids, the top-k
    store's state)."""
    size = llama_raw.llama_state_seq_get_size(llm.ctx, 0)
    buf = (ctypes.c_uint8 * max(size, 1))()
    n = llama_raw.llama_state_seq_get_data(llm.ctx, buf, size, 0)
    seq, c = llm.seq, llm.seq.cache
    return (ctypes.string_at(buf, n), c.pos, c.n_seen, c.n_rebase, seq.last, seq.text, seq.tokens,
            _store_state(llm))


def _restore(llm, blob: bytes, pos: Optional[int] = None) -> None:
    """Put a blob into the (cleared) sequence; StateError when llama.cpp refuses it or it does not end at pos."""
    llama_raw.llama_memory_clear(llama_raw.llama_get_memory(llm.ctx), True)
    if blob:
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if llama_raw.llama_state_seq_set_data(llm.ctx, buf, len(blob), 0) == 0:
            llama_raw.llama_memory_clear(llama_raw.llama_get_memory(llm.ctx), True)
            raise StateError("llama.cpp refused the saved cache")
    if pos is None:
        return
    last = llama_raw.llama_memory_seq_pos_max(llama_raw.llama_get_memory(llm.ctx), 0)
    if (last + 1 if blob and last >= 0 else 0) != pos:
        llama_raw.llama_memory_clear(llama_raw.llama_get_memory(llm.ctx), True)
        raise StateError(f"the saved cache ends at position {last + 1}, the header says {pos}")


# the module functions under other names: the mixin's methods of the same names shadow them in its class body
_save, _load, _model_id = save_state, load_state, model_id


class StateFiles:
    """LMInfinite's state-file methods over the functions above (a mixin; LMInfinite provides the session)."""

    def model_id(self) -> str:
        """Identity of the model file stored in state files (see state.model_id)."""
        return _model_id(self)

    @in_use
    def save_state(self, path: Union[str, os.PathLike], extra: Optional[dict] = None) -> int:
        return _save(self, path, extra)

    save_state.__doc__ = _save.__doc__

    @in_use
    def load_state(self, path: Union[str, os.PathLike]) -> dict:
        return _load(self, path)

    load_state.__doc__ = _load.__doc__
