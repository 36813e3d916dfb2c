"""Raw bindings: a private copy of llama-cpp-python's ctypes layer bound to our patched library, and our C functions.

The patched llama.cpp is built under its own names (libllama-lminf, libggml-lminf, ...; see CMakeLists.txt), so
it never collides with another llama.cpp in the process, such as the one of a llama-cpp-python the application
imports itself. llama-cpp-python's Python layer binds its functions to one library when `llama_cpp` is first
imported; this module imports that layer a second time, privately (outside sys.modules, whatever was or will be
imported under the name `llama_cpp`), with its library loader handed our library. Nothing process-wide is
touched: no environment variable, no `llama_cpp` module replaced, and the log callback is installed on our
library only. LMINF_LIB_PATH overrides the bundled library directory (development builds).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import os
import sys
import threading
from pathlib import Path

LIB_DIR = Path(os.environ.get("LMINF_LIB_PATH") or Path(__file__).resolve().parent / "lib")
LIB_NAME = {"darwin": "libllama-lminf.dylib", "win32": "llama-lminf.dll"}.get(sys.platform, "libllama-lminf.so")

_FIX = ("reinstall with `make install` (see README), or point LMINF_LIB_PATH at a directory holding the patched "
        "libllama-lminf built from this repository")


def _load_library() -> ctypes.CDLL:
    path = LIB_DIR / LIB_NAME
    if not path.exists():
        raise ImportError(f"lminf_gguf: patched libllama not found ({LIB_NAME} in {LIB_DIR}); {_FIX}")
    return ctypes.CDLL(str(path))


def _private_llama_cpp(lib: ctypes.CDLL):
    """Import llama-cpp-python's Python layer as a private package bound to `lib`; sys.modules is left as found."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.loader is None:
        raise ImportError("lminf_gguf: llama-cpp-python's Python layer is not installed; install it with "
                          "CMAKE_ARGS='-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF' pip install llama-cpp-python==0.3.36, "
                          f"or {_FIX}")

    def ours(name: str) -> bool:
        return name == "llama_cpp" or name.startswith("llama_cpp.")

    import _imp  # the global import lock: no other thread imports llama_cpp while the names are borrowed

    _imp.acquire_lock()
    try:
        saved = {name: sys.modules.pop(name) for name in list(sys.modules) if ours(name)}
        try:
            # the package object first, without running its __init__ (which loads the library) ...
            pkg = importlib.util.module_from_spec(spec)
            sys.modules["llama_cpp"] = pkg
            ext = importlib.import_module("llama_cpp._ctypes_extensions")
            default_loader = ext.load_shared_library

            def load_shared_library(base_name, base_path):
                return lib if base_name == "llama" else default_loader(base_name, base_path)

            # ... then its loader pointed at our library, then the package
            ext.load_shared_library = load_shared_library
            spec.loader.exec_module(pkg)
            for sub in ("llama_cpp", "_internals", "llama_chat_format"):
                importlib.import_module(f"llama_cpp.{sub}")
        finally:
            for name in [name for name in sys.modules if ours(name)]:
                del sys.modules[name]
            sys.modules.update(saved)
    finally:
        _imp.release_lock()
    if getattr(pkg.llama_cpp, "_lib", None) is not lib:  # pragma: no cover - a llama-cpp-python we do not know
        raise ImportError("lminf_gguf: llama-cpp-python's Python layer did not take the patched library")
    return pkg


lib = _load_library()
llama_cpp = _private_llama_cpp(lib)   # the package: llama_cpp._internals, llama_cpp.llama_chat_format, ...
llama_raw = llama_cpp.llama_cpp       # its raw bindings

# the newest function of the series (patch 0016): a library without it is a stale build
if not hasattr(lib, "llama_init_from_model_lminf") or not hasattr(lib, "llama_lminf_topk_state_set"):
    raise ImportError(f"lminf_gguf: {lib._name} lacks the LM-Infinite functions (a stale build?); {_FIX}")

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
                ("n_blocks", ctypes.c_uint32), ("n_units", ctypes.c_uint32), ("dir", ctypes.c_char_p),
                ("fa_lse", ctypes.c_bool)]


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
# the top-k store's state (patch 0016)
llama_lminf_topk_state_size = _bind("llama_lminf_topk_state_size", [_ctx_p], ctypes.c_size_t)
llama_lminf_topk_state_get = _bind("llama_lminf_topk_state_get", [_ctx_p, ctypes.c_void_p, ctypes.c_size_t],
                                   ctypes.c_size_t)
llama_lminf_topk_state_check = _bind("llama_lminf_topk_state_check", [_ctx_p, ctypes.c_char_p, ctypes.c_size_t],
                                     ctypes.c_int64)
llama_lminf_topk_state_set = _bind("llama_lminf_topk_state_set", [_ctx_p, ctypes.c_char_p, ctypes.c_size_t],
                                   ctypes.c_bool)
llama_lminf_enabled = _bind("llama_lminf_enabled", [llama_raw.llama_context_p_ctypes], ctypes.c_bool)
llama_lminf_n_global = _bind("llama_lminf_n_global", [llama_raw.llama_context_p_ctypes], ctypes.c_int32)
llama_lminf_n_local = _bind("llama_lminf_n_local", [llama_raw.llama_context_p_ctypes], ctypes.c_int32)
llama_lminf_dist_max = _bind("llama_lminf_dist_max", [llama_raw.llama_context_p_ctypes], ctypes.c_int32)
llama_lminf_flash_attn = _bind("llama_lminf_flash_attn", [llama_raw.llama_context_p_ctypes], ctypes.c_bool)
llama_lminf_cache_size = _bind("llama_lminf_cache_size", [llama_raw.llama_context_p_ctypes], ctypes.c_uint32)
llama_lminf_cache_used = _bind("llama_lminf_cache_used", [llama_raw.llama_context_p_ctypes], ctypes.c_uint32)
llama_lminf_cache_size_swa = _bind("llama_lminf_cache_size_swa", [llama_raw.llama_context_p_ctypes], ctypes.c_uint32)

# -- the log of our library: errors kept for exception messages, text shown only for verbose sessions -------------

_LOG_ERROR = 4  # GGML_LOG_LEVEL_ERROR
_errors: list = []  # the last few error lines, for exception messages (see last_errors)
_verbose = threading.local()  # .on: the calling thread's session or model asked for llama.cpp's log


def _on_log(level, text, user):
    line = text.decode("utf-8", errors="replace")
    if level == _LOG_ERROR:
        _errors.append(line.strip())
        del _errors[:-8]
    if getattr(_verbose, "on", False):
        sys.stderr.write(line)


# one callback object for the life of the process: llama.cpp may call it from any thread, so it is never freed
_LOG = llama_raw.llama_log_callback(_on_log)
llama_raw.llama_log_set(_LOG, ctypes.c_void_p())


def last_errors() -> list:
    """The error lines llama.cpp logged since the previous call (the last 8 at most)."""
    lines = list(_errors)
    _errors.clear()
    return lines


@contextlib.contextmanager
def verbosity(verbose: bool):
    """Show llama.cpp's log on stderr while this thread runs the block (per call: each session keeps its own)."""
    before = getattr(_verbose, "on", False)
    _verbose.on = bool(verbose) or bool(os.environ.get("LMINF_VERBOSE"))
    try:
        yield
    finally:
        _verbose.on = before


llama_raw.llama_backend_init()
