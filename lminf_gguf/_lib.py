"""Raw bindings: load llama-cpp-python's ctypes layer against our patched libllama, plus our new C functions.

llama-cpp-python reads LLAMA_CPP_LIB_PATH once, when `llama_cpp` is first imported, so this module must run
before anything else imports it. LMINF_LIB_PATH overrides the bundled library directory (development builds).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

LIB_DIR = Path(os.environ.get("LMINF_LIB_PATH") or Path(__file__).resolve().parent / "lib")

_FIX = ("reinstall with `make install` (see README), or point LMINF_LIB_PATH at a directory holding the patched "
        "libllama built from this repository")

if "llama_cpp" not in sys.modules:
    if not (LIB_DIR / "libllama.so").exists() and not (LIB_DIR / "libllama.dylib").exists() \
            and not (LIB_DIR / "llama.dll").exists():
        raise ImportError(f"lminf_gguf: patched libllama not found in {LIB_DIR}; {_FIX}")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(LIB_DIR)

try:
    import llama_cpp  # noqa: E402,F401  (re-exported: the engine uses its _internals)
    import llama_cpp.llama_cpp as llama_raw  # noqa: E402
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"lminf_gguf: cannot import llama_cpp ({e}); install its Python layer with "
                      "CMAKE_ARGS='-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF' pip install llama-cpp-python==0.3.36, "
                      f"or {_FIX}") from e

lib = llama_raw._lib

if not hasattr(lib, "llama_init_from_model_lminf"):
    raise ImportError(f"lminf_gguf: the libllama loaded by llama_cpp ({getattr(lib, '_name', '?')}) lacks the "
                      f"LM-Infinite functions (an unpatched build was imported first?); {_FIX}")

_ctx_p = ctypes.c_void_p


def _bind(name, argtypes, restype):
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


llama_init_from_model_lminf = _bind(
    "llama_init_from_model_lminf",
    [llama_raw.llama_model_p_ctypes, llama_raw.llama_context_params, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32],
    llama_raw.llama_context_p_ctypes)


class llama_lminf_topk_params(ctypes.Structure):
    _fields_ = [("k", ctypes.c_int32), ("layer_first", ctypes.c_int32), ("dist", ctypes.c_int32),
                ("type", ctypes.c_int), ("seg_rows", ctypes.c_uint32), ("block", ctypes.c_uint32),
                ("n_blocks", ctypes.c_uint32), ("dir", ctypes.c_char_p)]


llama_lminf_topk_default_params = _bind("llama_lminf_topk_default_params", [], llama_lminf_topk_params)
llama_init_from_model_lminf_topk = _bind(
    "llama_init_from_model_lminf_topk",
    [llama_raw.llama_model_p_ctypes, llama_raw.llama_context_params, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
     llama_lminf_topk_params],
    llama_raw.llama_context_p_ctypes)
llama_lminf_topk_store_rows = _bind("llama_lminf_topk_store_rows", [llama_raw.llama_context_p_ctypes], ctypes.c_int64)
llama_lminf_topk_row_bytes = _bind("llama_lminf_topk_row_bytes", [llama_raw.llama_context_p_ctypes], ctypes.c_size_t)
llama_lminf_topk_store_bytes = _bind("llama_lminf_topk_store_bytes", [llama_raw.llama_context_p_ctypes],
                                     ctypes.c_size_t)
llama_lminf_enabled = _bind("llama_lminf_enabled", [llama_raw.llama_context_p_ctypes], ctypes.c_bool)
llama_lminf_n_global = _bind("llama_lminf_n_global", [llama_raw.llama_context_p_ctypes], ctypes.c_int32)
llama_lminf_n_local = _bind("llama_lminf_n_local", [llama_raw.llama_context_p_ctypes], ctypes.c_int32)
llama_lminf_dist_max = _bind("llama_lminf_dist_max", [llama_raw.llama_context_p_ctypes], ctypes.c_int32)
llama_lminf_flash_attn = _bind("llama_lminf_flash_attn", [llama_raw.llama_context_p_ctypes], ctypes.c_bool)
llama_lminf_cache_size = _bind("llama_lminf_cache_size", [llama_raw.llama_context_p_ctypes], ctypes.c_uint32)
llama_lminf_cache_used = _bind("llama_lminf_cache_used", [llama_raw.llama_context_p_ctypes], ctypes.c_uint32)

_LOG_ERROR = 4  # GGML_LOG_LEVEL_ERROR
_errors: list = []  # the last few error lines of the quiet log, for exception messages (see last_errors)


def _keep_errors(level, text, user):
    if level == _LOG_ERROR:
        _errors.append(text.decode("utf-8", errors="replace").strip())
        del _errors[:-8]


# one callback object for the life of the process: llama.cpp may call the installed callback from another thread
# while a session is created, so a replaced callback must never be freed
_QUIET_LOG = llama_raw.llama_log_callback(_keep_errors)


def last_errors() -> list:
    """The error lines llama.cpp logged while quiet since the previous call (the last 8 at most)."""
    lines = list(_errors)
    _errors.clear()
    return lines


def set_verbose(verbose: bool) -> None:
    """Route llama.cpp's log (process-wide) to stderr (verbose) or drop it."""
    if verbose:
        # a NULL callback restores llama.cpp's own logger (stderr); ctypes refuses a plain None here
        llama_raw.llama_log_set(llama_raw.llama_log_callback(), ctypes.c_void_p())
    else:
        llama_raw.llama_log_set(_QUIET_LOG, ctypes.c_void_p())


llama_raw.llama_backend_init()
set_verbose(bool(os.environ.get("LMINF_VERBOSE")))
