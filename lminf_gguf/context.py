"""A session's llama.cpp context: how it is created for each mode, the owning wrappers of the context and its
batch, and who may use them when.

SessionUse is the rule for calls: one thread at a time (llama.cpp aborts or crashes when two threads decode in
one context, so a second thread is refused at once with SessionBusyError rather than made to wait, which would
hide the misuse and can deadlock an unfinished stream), and close() from any thread never frees what a call in
progress uses: it cancels the call and the last use frees the context.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Callable, Optional

from . import _lib
from ._lib import llama_raw
from .errors import InvalidInputError, SessionBusyError
from .options import KV_TYPES, MODES, STORE_TYPES, default_threads

_FLASH = {None: "LLAMA_FLASH_ATTN_TYPE_AUTO", True: "LLAMA_FLASH_ATTN_TYPE_ENABLED",
          False: "LLAMA_FLASH_ATTN_TYPE_DISABLED"}


class SessionUse:
    """Calls in progress on one session (see the module docstring)."""

    def __init__(self, free: Callable[[], None], cancel: threading.Event):
        self._lock = threading.Lock()
        self._users = 0
        self._owner: Optional[int] = None   # thread of the calls in progress
        self._close_pending = False
        self._closed = False
        self._free, self._cancel = free, cancel

    @contextlib.contextmanager
    def __call__(self, verbose: bool = False):
        me = threading.get_ident()
        with self._lock:
            if self._close_pending or self._closed:
                raise RuntimeError("this LMInfinite session is closed")
            if self._users and self._owner != me:
                raise SessionBusyError("this LMInfinite session is in use by another thread (a call or an unfinished "
                                       "stream); use one session per thread, sharing a Model to share the weights")
            self._owner = me
            self._users += 1
        try:
            with _lib.verbosity(verbose):
                yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._close_pending:
                    self._close_now()

    def close(self) -> None:
        """Free now, or cancel the call in progress and free when it returns."""
        with self._lock:
            if self._users:
                self._close_pending = True
                self._cancel.set()
                return
            self._close_now()

    def _close_now(self) -> None:
        self._closed = True
        self._free()


def in_use(method):
    """Run a method that touches the context or the model as a use of the session (its `use`, a SessionUse). Entry
    points only: what they call (seq.decode, inputs.piece) runs inside their use."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.use(self.verbose):
            return method(self, *args, **kwargs)
    return wrapper


def in_use_stream(method):
    """in_use for a generator method: the use lasts until the stream ends or is closed."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.use(self.verbose):
            yield from method(self, *args, **kwargs)
    return wrapper


def context_params(n_batch: int, n_ubatch: int, n_threads: Optional[int], type_k: str, type_v: str,
                   flash_attn: Optional[bool]):
    """llama_context_params for one sequence."""
    cparams = llama_raw.llama_context_default_params()
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_ubatch
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = n_threads or default_threads()
    cparams.type_k = KV_TYPES[type_k]
    cparams.type_v = KV_TYPES[type_v]
    cparams.flash_attn_type = getattr(llama_raw, _FLASH[flash_attn])
    cparams.no_perf = True
    # per-token hidden states in embeddings mode, pooled by embeddings.py over any length: a pooling from the
    # model's metadata would pool inside llama.cpp, one ubatch at a time (no effect outside embeddings mode)
    cparams.pooling_type = llama_raw.LLAMA_POOLING_TYPE_NONE
    return cparams


def new_context(llm, cparams, n_ctx: Optional[int], topk_params) -> Optional[int]:
    """A llama.cpp context for llm.mode (the caller holds the model's context lock); None when llama.cpp refuses."""
    mode = MODES[llm.mode]
    llama_model = llm.model.llama_model
    if not mode.bounded:
        cparams.n_ctx = (llm.n_global + llm.n_local + llm.n_batch) if mode.shift else (n_ctx or llm.n_ctx_train)
        return llama_raw.llama_init_from_model(llama_model, cparams)
    if topk_params is not None:
        return _lib.llama_init_from_model_lminf_topk(llama_model, cparams, llm.n_global, llm.n_local, llm.dist_max,
                                                     topk_params)
    return _lib.llama_init_from_model_lminf(llama_model, cparams, llm.n_global, llm.n_local,
                                            llm.dist_max if mode.ceiling else 0)


class LlamaContext:
    """An owned llama_context (as llama-cpp-python's _internals.LlamaContext, for contexts made by new_context): ctx
    is its pointer, None once closed. close() frees it once, from any thread, under the model's context lock (a
    model's contexts are created and freed one at a time)."""

    def __init__(self, ctx, lock: threading.Lock):
        self.ctx, self._lock = ctx, lock

    def close(self) -> None:
        with self._lock:
            ctx, self.ctx = self.ctx, None
            if ctx:
                llama_raw.llama_free(ctx)


class LlamaBatch:
    """An owned llama_batch of up to n_tokens tokens of one sequence (fill_batch fills it); batch is the struct, None
    once closed. close() frees it once, from any thread."""

    def __init__(self, n_tokens: int):
        self.batch = llama_raw.llama_batch_init(n_tokens, 0, 1)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            batch, self.batch = self.batch, None
            if batch is not None:
                llama_raw.llama_batch_free(batch)


def topk_params(k: int, layer_first: int, dist: int, store_type: str, seg_rows: int, block: int, n_blocks: int,
                store_dir, fa_lse: bool = True, n_units: int = 0) -> "_lib.llama_lminf_topk_params":
    """llama_lminf_topk_params (llama.h) from LMInfinite's top-k arguments: every field set here."""
    params = _lib.llama_lminf_topk_params()
    params.k, params.layer_first, params.dist = k, layer_first, dist
    params.type, params.seg_rows = STORE_TYPES[store_type], seg_rows
    params.block, params.n_blocks, params.n_units = block, n_blocks, n_units
    params.dir = os.fsencode(store_dir) if store_dir is not None else None
    params.fa_lse = fa_lse
    return params


class CacheInfo:
    """What a session's cache holds: the cache_info and topk_store_bytes_per_token methods of LMInfinite."""

    @in_use
    def cache_info(self) -> dict:
        """KV cells allocated and in use, the cells bound, and where the stream stands."""
        return session_info(self)

    @in_use
    def topk_store_bytes_per_token(self) -> int:
        """lminf-topk: bytes the middle-token store takes per token of the stream (K and V, all top-k layers)."""
        return int(_lib.llama_lminf_topk_row_bytes(self.ctx))


def session_info(llm) -> dict:
    """KV cells allocated and in use, the cells bound, and where the stream stands."""
    cache = llm.seq.cache
    size, used = cache.cells()
    bounded = MODES[llm.mode].bounded
    swa = int(_lib.llama_lminf_cache_size_swa(llm.ctx))
    info = {
        "mode": llm.mode,
        "n_global": llm.n_global,
        "n_local": llm.n_local,
        "dist_max": llm.dist_max if MODES[llm.mode].ceiling else None,
        "cells_total": size,
        "cells_used": used,
        # models with interleaved sliding-window layers: their local layers' own cache (its window + a ubatch,
        # padded by llama.cpp) comes on top of LM-Infinite's G + L + ubatch cells for the global layers
        "cells_bound": (llm.n_global + llm.n_local + llm.n_ubatch if bounded else cache.n_ctx) + swa,
        "cells_swa": swa,
        "n_tokens": cache.n_seen,
        "position": cache.pos,
        "rebases": cache.n_rebase,
        "shifts": cache.n_shift,
        "flash_attn": bool(_lib.llama_lminf_flash_attn(llm.ctx)),
    }
    if MODES[llm.mode].topk:
        info.update(store_rows=int(_lib.llama_lminf_topk_store_rows(llm.ctx)),
                    store_bytes=int(_lib.llama_lminf_topk_store_bytes(llm.ctx)),
                    store_bytes_per_token=int(_lib.llama_lminf_topk_row_bytes(llm.ctx)))
    return info


def fill_batch(batch, tokens, pos: int, n_vocab: int, all_logits: bool) -> None:
    """One sequence's tokens at positions pos, pos + 1, ... into a llama_batch (logits for the last one, or all);
    InvalidInputError for an id outside the vocabulary (llama.cpp aborts on one)."""
    n = len(tokens)
    batch.n_tokens = n
    for k, tok in enumerate(tokens):
        if not 0 <= tok < n_vocab:
            raise InvalidInputError(f"token id {tok} outside the vocabulary [0, {n_vocab})")
        batch.token[k] = tok
        batch.pos[k] = pos + k
        batch.n_seq_id[k] = 1
        batch.seq_id[k][0] = 0
        batch.logits[k] = all_logits or k == n - 1
