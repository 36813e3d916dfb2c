"""Refuse GGUF files whose metadata would make llama.cpp abort the process, before llama.cpp reads them.

llama.cpp's GGUF parser itself is robust against malformed files (truncations, byte flips, absurd counts, dims
and offsets all end in a clean load failure; see docs/RELIABILITY.md and scripts/fuzz_gguf.py), but some
well-formed files with wrong metadata hit a GGML_ASSERT / GGML_ABORT in the pinned llama.cpp, which kills the
host process (a library must never do that). check_model_file() reads the key-value section only (a small,
bounded parser over the file: every length is checked against the file size; reading a 150k-token vocabulary
takes milliseconds, gguf.GGUFReader takes seconds) and raises ValueError for:

- block_count outside 1..512 (LLAMA_MAX_LAYERS): GGML_ASSERT in llama_model::load_hparams;
- an unknown rope.scaling.type: GGML_ASSERT in load_hparams;
- a norm epsilon that is NaN or negative: GGML_ASSERT(eps >= 0) in the first decode;
- byte-fallback tokens (token type BYTE) in a vocabulary whose tokenizer model has no byte tokens (bert/WPM,
  rwkv, ...): GGML_ABORT in llama_vocab::token_to_byte while the vocabulary loads.

Anything it cannot parse is left to llama.cpp, which then refuses the file with its own (clean) error.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Dict

from .errors import InvalidInputError

__all__ = ["check_model_file", "read_kv"]

LLAMA_MAX_LAYERS = 512
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# tokenizer models whose llama_vocab::token_to_byte handles byte tokens (SPM, BPE, UGM)
BYTE_TOKEN_MODELS = ("llama", "gpt2", "t5", "gemma4")
TOKEN_TYPE_BYTE = 6

# GGUF value types: size of the fixed-size ones, struct format
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# keys whose array values are kept (others are skipped, only their bounds checked)
_KEEP_ARRAYS = ("tokenizer.ggml.token_type",)


class _Malformed(Exception):
    pass


def read_kv(path: str) -> Dict[str, object]:
    """The key-value section of a GGUF file as a dict (arrays other than the token types are skipped: value
    None). Raises _Malformed on anything out of bounds or unknown (llama.cpp then gives its own error)."""
    size = os.path.getsize(path)
    if size < 24:
        raise _Malformed("file too short")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise _Malformed("bad magic")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", m, 4)
        if version not in (2, 3) or n_kv > size // 12:   # a KV item takes >= 12 bytes
            raise _Malformed("bad version or KV count")
        off = 24

        def need(n):
            if n < 0 or off + n > size:
                raise _Malformed("value runs past the end of the file")

        def string():
            nonlocal off
            need(8)
            (n,) = struct.unpack_from("<Q", m, off)
            need(8 + n)
            s = m[off + 8:off + 8 + n]
            off += 8 + n
            return s.decode("utf-8", errors="replace")

        def scalar(t):
            nonlocal off
            fmt = _SCALAR[t]
            k = struct.calcsize(fmt)
            need(k)
            (v,) = struct.unpack_from(fmt, m, off)
            off += k
            return v

        out: Dict[str, object] = {}
        for _ in range(n_kv):
            key = string()
            t = scalar(4)
            if t in _SCALAR:
                out[key] = scalar(t)
            elif t == _STRING:
                out[key] = string()
            elif t == _ARRAY:
                it, n = scalar(4), scalar(10)
                if it in _SCALAR:
                    k = struct.calcsize(_SCALAR[it])
                    need(k * n)
                    if key in _KEEP_ARRAYS and it in (4, 5):
                        out[key] = memoryview(m[off:off + k * n]).cast("i" if it == 5 else "I").tolist()
                    else:
                        out[key] = None
                    off += k * n
                elif it == _STRING:
                    if n > (size - off) // 8:
                        raise _Malformed("array too long")
                    short = set()   # the token texts of up to 6 bytes (byte tokens), for the byte check
                    for _ in range(n):
                        need(8)
                        (sl,) = struct.unpack_from("<Q", m, off)
                        need(8 + sl)
                        if sl <= 6:
                            short.add(bytes(m[off + 8:off + 8 + sl]))
                        off += 8 + sl
                    out[key] = short if key == "tokenizer.ggml.tokens" else None
                else:
                    raise _Malformed("unsupported array item type")
            else:
                raise _Malformed("unknown value type")
        return out


def check_model_file(path: str) -> frozenset:
    """Raise ValueError when the GGUF file at path has metadata the pinned llama.cpp would abort on.

    Returns the bytes that the vocabulary cannot represent (an SPM/UGM vocabulary without a "<0xXX>" or
    single-byte token for them): llama_tokenize throws an uncaught std::out_of_range (process abort) on a text
    piece it has to split into such bytes, so the engine refuses texts holding them (see guard_tokenize)."""
    try:
        kv = read_kv(path)
    except (_Malformed, OSError, ValueError, struct.error, OverflowError, MemoryError):
        return frozenset()  # malformed: llama.cpp's parser refuses it cleanly
    arch = kv.get("general.architecture")
    if not isinstance(arch, str):
        return frozenset()  # llama.cpp refuses a file without an architecture
    problems = []
    n_layer = kv.get(f"{arch}.block_count")
    if isinstance(n_layer, int) and not isinstance(n_layer, bool) and not 1 <= n_layer <= LLAMA_MAX_LAYERS:
        problems.append(f"{arch}.block_count = {n_layer} (llama.cpp supports 1..{LLAMA_MAX_LAYERS} layers)")
    scaling = kv.get(f"{arch}.rope.scaling.type")
    if isinstance(scaling, str) and scaling not in ROPE_SCALING_TYPES:
        problems.append(f"{arch}.rope.scaling.type = {scaling!r} (known: {', '.join(ROPE_SCALING_TYPES)})")
    for key in (f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.layer_norm_epsilon"):
        eps = kv.get(key)
        if isinstance(eps, float) and not (math.isfinite(eps) and eps >= 0):
            problems.append(f"{key} = {eps} (must be a finite number >= 0)")
    model = kv.get("tokenizer.ggml.model")
    types = kv.get("tokenizer.ggml.token_type")
    if isinstance(model, str) and model not in BYTE_TOKEN_MODELS and types and TOKEN_TYPE_BYTE in types:
        problems.append(f"byte tokens in a {model!r} vocabulary (only {', '.join(BYTE_TOKEN_MODELS)} "
                        "vocabularies have them)")
    if problems:
        raise ValueError(f"cannot load model {path}: invalid metadata: {'; '.join(problems)}")
    tokens = kv.get("tokenizer.ggml.tokens")
    if model in ("llama", "t5") and isinstance(tokens, set):
        return frozenset(b for b in range(256) if f"<0x{b:02X}>".encode() not in tokens
                         and bytes([b]) not in tokens)
    return frozenset()


def guard_tokenize(tokenize, missing: frozenset, path: str):
    """tokenize(text: bytes, add_bos, special) that raises ValueError instead of letting llama.cpp abort on a
    byte the vocabulary cannot represent (missing: from check_model_file)."""
    table = bytes(range(256))
    bad = bytes(sorted(missing))

    def checked(text: bytes, *args, **kw):
        if len(bytes(text).translate(table, bad)) != len(text):
            b = next(c for c in bytes(text) if c in missing)
            raise InvalidInputError(f"the vocabulary of {os.path.basename(path)} has no token for byte 0x{b:02X} (no "
                             "byte-fallback tokens); this text cannot be tokenised with it")
        return tokenize(text, *args, **kw)
    return checked
