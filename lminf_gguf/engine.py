"""LMInfinite: one GGUF model and one sequence evaluated with LM-Infinite attention in the patched llama.cpp.

Modes
  "lminf"   (default) Λ-mask (n_global sinks + window n_local) with the distance ceiling dist_max, in flash
            attention where the backend has its leading-column KQ bias (CPU; others fall back to the non-flash
            path under flash_attn=None), else in the non-flash path; both are exact.
  "lminf-topk"  "lminf" plus the top-k middle tokens of the paper's later version: every token's key and value
            is kept in a store outside the KV cache (topk_store_bytes_per_token() bytes per token, on the host or
            memory-mapped in store_dir); in layers >= topk_layer, each decoded token and the last row of each
            prompt ubatch also attend to the topk middle tokens of each KV head that score highest, placed at
            distance topk_dist (default n_local/2). The KV cache stays bounded; the store grows with the stream.
            Non-flash attention only.
  "mask"    Λ-mask only (no ceiling); flash attention as requested.
  "vanilla" unchanged llama.cpp with an n_ctx cache; streams longer than n_ctx raise ContextFullError.
  "shift"   the baseline users have today: llama.cpp's context shift (keep the first n_global tokens, drop half
            of the rest when the cache is full, re-rotate the remainder) over a cache of G + L + n_batch cells,
            the KV budget of "lminf".

Thread safety: an LMInfinite object holds one llama.cpp context and must be used by one thread at a time
(including the iteration of its streams); create one object per thread. To load the weights once, load a
models.Model and pass it as `model` to each: the sessions share it and keep their own caches, and give the same
results as serial runs (tested). The methods meant for another thread are cancel() and close(): close() during a
call cancels it and frees the context when it returns (or when its stream is closed), never under its feet.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import functools
import hashlib
import json
import os
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np

from . import _lib
from ._lib import llama_cpp, llama_raw
from .cache import ContextFullError, SequenceCache
from .models import Model, lminf_defaults
from .text import FileChunks, iter_token_blocks

MODES = ("vanilla", "shift", "mask", "lminf", "lminf-topk")

# modes with the distance ceiling (exact rebasing)
CEILING_MODES = ("lminf", "lminf-topk")

STORE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}

# positions up to 2^24 are exact in float32
MASK_REBASE_AT = 1 << 24

KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}

_FLASH = {None: "LLAMA_FLASH_ATTN_TYPE_AUTO", True: "LLAMA_FLASH_ATTN_TYPE_ENABLED",
          False: "LLAMA_FLASH_ATTN_TYPE_DISABLED"}

__all__ = ["LMInfinite", "ContextFullError", "Cancelled", "StateError", "SessionBusyError", "MODES",
           "CHATML_TEMPLATE"]


class SessionBusyError(RuntimeError):
    """A session was called from a second thread while a call (or an unfinished stream) of another was running."""


def _in_use(method):
    """Run a method that touches the context or the model as a use of the session (see LMInfinite.close). Public
    entry points only: the private helpers they call (_decode, _piece) run inside their use."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._use():
            return method(self, *args, **kwargs)
    return wrapper


def _in_use_stream(method):
    """_in_use for a generator method: the use lasts until the stream ends or is closed."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._use():
            yield from method(self, *args, **kwargs)
    return wrapper


class LMInfinite:
    """A GGUF model with an unbounded stream of tokens and a bounded KV cache.

    model: path of a GGUF file, hf:OWNER/REPO/FILE.gguf, None for the offline default model (SmolLM2-135M-Instruct
        Q4_1), or a loaded Model to share with other sessions (n_gpu_layers is then the Model's).
    n_global, n_local, dist_max: G, L, C; None takes the GGUF keys lminf.* if present, else G = 10,
        L = the model's trained context, C = L.
    n_ctx: vanilla mode only (default: trained context).
    type_k, type_v: KV cache types ("f16", "f32", "q8_0", ...).
    flash_attn: None lets llama.cpp decide (on where the backend supports it, also with the distance ceiling,
        which flash attention takes as a bias of the sink columns); forced off in "lminf-topk" mode.
        cache_info()["flash_attn"] says what was chosen.
    rebase_at: largest position handed to llama.cpp before the window is moved down (see cache.py); default
        G + 2L + n_batch in "lminf" mode, 2^24 in "mask" mode (where moving the window changes sink distances).
    topk, topk_layer, topk_dist ("lminf-topk"): middle tokens per KV head, first layer that picks them, distance
        they are attended at (default n_local/2); paper defaults 5, 4, L/2. Needs n_ubatch <= n_local.
    store_type, store_dir, store_segment ("lminf-topk"): type of the stored keys and values (f32, f16, q8_0, q4_0;
        q8_0/q4_0 need a head size divisible by 32), a directory for memory-mapped store files (None: memory),
        rows of the first store segment (segment s holds store_segment * 2^min(s, 10) rows, 32 at most).
    topk_block, topk_blocks ("lminf-topk"): block index; with topk_block > 0 (dividing store_segment) a query
        scores blocks of topk_block keys by an upper bound (element-wise min/max) and scans the keys of its
        topk_blocks best blocks per segment only, instead of every middle key.
    """

    def __init__(self, model: Union[str, os.PathLike, Model, None] = None, *, n_global: Optional[int] = None,
                 n_local: Optional[int] = None, dist_max: Optional[int] = None, mode: str = "lminf",
                 n_ctx: Optional[int] = None, n_batch: int = 512, n_ubatch: Optional[int] = None,
                 n_threads: Optional[int] = None, n_gpu_layers: int = 0, type_k: str = "f16",
                 type_v: str = "f16", flash_attn: Optional[bool] = None, rebase_at: Optional[int] = None,
                 topk: int = 5, topk_layer: int = 4, topk_dist: Optional[int] = None, store_type: str = "f16",
                 store_dir: Union[str, os.PathLike, None] = None, store_segment: int = 4096,
                 topk_block: int = 0, topk_blocks: int = 8,
                 verbose: bool = False):
        # calls in progress, so that close() from another thread never frees what they use
        self._users_lock = threading.Lock()
        self._users = 0
        self._owner: Optional[int] = None  # thread of the calls in progress
        self._close_pending = False
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        for name, value, low in (("n_global", n_global, 0), ("n_local", n_local, 1), ("dist_max", dist_max, 1),
                                 ("n_batch", n_batch, 1), ("n_ubatch", n_ubatch, 1), ("n_ctx", n_ctx, 1),
                                 ("topk", topk, 1), ("topk_layer", topk_layer, 0), ("topk_dist", topk_dist, 1),
                                 ("store_segment", store_segment, 1), ("topk_block", topk_block, 0),
                                 ("topk_blocks", topk_blocks, 1)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
        for name, value in (("type_k", type_k), ("type_v", type_v)):
            if value not in KV_TYPES:
                raise ValueError(f"{name} must be one of {', '.join(KV_TYPES)}, not {value!r}")
        if store_type not in STORE_TYPES:
            raise ValueError(f"store_type must be one of {', '.join(STORE_TYPES)}, not {store_type!r}")
        if store_dir is not None and not os.path.isdir(store_dir):
            raise ValueError(f"store_dir is not a directory: {store_dir}")

        # a shared Model stays open when this session closes; one loaded here is this session's own
        self._own_model = not isinstance(model, Model)
        self.model = Model(model, n_gpu_layers=n_gpu_layers, verbose=verbose) if self._own_model else model
        if self.model.llama is None:
            raise ValueError("the shared Model is closed")
        self.verbose = verbose  # llama.cpp's log on stderr during this session's calls (lminf_gguf._lib.verbosity)
        self._model = self.model.llama
        self.model_path = self.model.path
        self.metadata = self.model.metadata
        self.n_ctx_train = self.model.n_ctx_train
        self.n_vocab = self.model.n_vocab
        defaults = lminf_defaults(self.metadata, self.n_ctx_train)
        self.mode = mode
        self.n_global = defaults["n_global"] if n_global is None else n_global
        self.n_local = defaults["n_local"] if n_local is None else n_local
        self.dist_max = dist_max or defaults["dist_max"] or self.n_local
        self.n_batch = n_batch
        self.n_ubatch = min(n_ubatch or n_batch, n_batch)
        self.type_k, self.type_v = type_k, type_v
        self._cancel = threading.Event()
        self._last: Optional[np.ndarray] = None    # logits after the last evaluated token
        self._text: Optional[bytearray] = None     # the text the sequence holds, when known (chat reuse)
        self._formatter = None
        self._template_source = None
        self._bos_text = ""
        self._model_id: Optional[str] = None

        cparams = llama_raw.llama_context_default_params()
        cparams.n_batch = n_batch
        cparams.n_ubatch = self.n_ubatch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = n_threads or os.cpu_count() or 1
        cparams.type_k = KV_TYPES[type_k]
        cparams.type_v = KV_TYPES[type_v]
        cparams.flash_attn_type = getattr(llama_raw, _FLASH[flash_attn])
        cparams.no_perf = True

        topk_params = None
        if mode == "lminf-topk":
            if topk_layer >= self.model.n_layer:
                raise ValueError(f"topk_layer must be below the model's {self.model.n_layer} layers, not {topk_layer}")
            if self.n_ubatch > self.n_local:
                raise ValueError(f"lminf-topk needs n_ubatch ({self.n_ubatch}) <= n_local ({self.n_local})")
            self.topk, self.topk_layer = topk, topk_layer
            self.topk_dist = topk_dist or max(1, self.n_local // 2)
            self.store_type = store_type
            topk_params = _lib.llama_lminf_topk_default_params()
            topk_params.k, topk_params.layer_first, topk_params.dist = topk, topk_layer, self.topk_dist
            topk_params.type, topk_params.seg_rows = STORE_TYPES[store_type], store_segment
            topk_params.block, topk_params.n_blocks = topk_block, topk_blocks
            topk_params.dir = os.fsencode(store_dir) if store_dir is not None else None
        with self.model.context_lock, _lib.verbosity(verbose):
            ctx = self._new_context(cparams, n_ctx, topk_params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a {mode} context for {self.model_path} "
                               "(run with verbose=True for its log)")
        self.ctx = ctx
        self._batch = llama_raw.llama_batch_init(n_batch, 0, 1)
        # llama.cpp may grant less than asked (n_batch is capped at n_ctx, e.g. a small vanilla n_ctx or a small
        # trained context) and aborts the process on a batch above what it granted: never hand it more
        self.n_batch = min(self.n_batch, int(llama_raw.llama_n_batch(ctx)))
        self.n_ubatch = min(self.n_ubatch, int(llama_raw.llama_n_ubatch(ctx)), self.n_batch)
        n_batch = self.n_batch

        # rebasing is exact only with the ceiling: in "mask" mode sinks keep their true, growing distance, so the
        # window is moved only where float32 RoPE angles would otherwise lose all precision
        min_rebase = self.n_global + self.n_local + n_batch
        default_rebase = min_rebase + self.n_local if mode in CEILING_MODES else MASK_REBASE_AT
        self._cache = SequenceCache(
            ctx=ctx, bounded=mode not in ("vanilla", "shift"), shift=mode == "shift", n_global=self.n_global,
            n_local=self.n_local,
            n_ctx=llama_raw.llama_n_ctx(ctx), rebase_at=max(rebase_at or default_rebase, min_rebase))

    def _new_context(self, cparams, n_ctx: Optional[int], topk_params) -> Optional[int]:
        """A llama.cpp context for self.mode (the caller holds the model's context lock)."""
        if self.mode in ("vanilla", "shift"):
            if self.mode == "vanilla":
                cparams.n_ctx = n_ctx or self.n_ctx_train
            else:
                cparams.n_ctx = self.n_global + self.n_local + self.n_batch
            return llama_raw.llama_init_from_model(self._model.model, cparams)
        if topk_params is not None:
            return _lib.llama_init_from_model_lminf_topk(self._model.model, cparams, self.n_global, self.n_local,
                                                         self.dist_max, topk_params)
        ceiling = self.dist_max if self.mode == "lminf" else 0
        return _lib.llama_init_from_model_lminf(self._model.model, cparams, self.n_global, self.n_local, ceiling)

    # -- lifetime ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context (and the model, unless it is a shared Model). Safe from any thread: a call in progress
        is cancelled and the context is freed when it returns; later calls raise RuntimeError."""
        lock = getattr(self, "_users_lock", None)
        if lock is None:
            return
        with lock:
            if self._users:
                self._close_pending = True
                self._cancel.set()
                return
            self._free()

    def _free(self) -> None:
        if getattr(self, "_batch", None) is not None:
            llama_raw.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            with self.model.context_lock:
                llama_raw.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "_model", None) is not None:
            if self._own_model:
                self.model.close()
            self._model = None

    @contextlib.contextmanager
    def _use(self):
        me = threading.get_ident()
        with self._users_lock:
            if self._close_pending or not getattr(self, "ctx", None):
                raise RuntimeError("this LMInfinite session is closed")
            # one thread at a time: llama.cpp aborts or crashes when two threads decode in one context; refuse
            # at once rather than wait (a wait would hide the misuse and can deadlock an unfinished stream)
            if self._users and self._owner != me:
                raise SessionBusyError("this LMInfinite session is in use by another thread (a call or an unfinished "
                                       "stream); use one session per thread, sharing a Model to share the weights")
            self._owner = me
            self._users += 1
        try:
            with _lib.verbosity(self.verbose):
                yield
        finally:
            with self._users_lock:
                self._users -= 1
                if self._users == 0 and self._close_pending:
                    self._free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    # -- tokens -----------------------------------------------------------------------------------------------

    @_in_use
    def tokenize(self, text: Union[str, bytes], add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, str):
            text = text.encode("utf-8", errors="replace")
        return self._model.tokenize(text, add_bos, special)

    @_in_use
    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._model.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def _piece(self, token: int) -> bytes:
        # llama-cpp-python's LlamaModel.token_to_piece returns its whole buffer, NUL padding included
        buf = ctypes.create_string_buffer(64)
        n = llama_raw.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_raw.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    # -- evaluation -------------------------------------------------------------------------------------------

    @_in_use
    def reset(self) -> None:
        """Start a fresh sequence."""
        self._cache.reset()
        self._last = None
        self._text = None

    def cancel(self) -> None:
        """Ask the call in progress (from another thread, or a signal handler) to stop at the next token or batch.

        Generation (generate, create_completion, create_chat_completion) then ends early with finish_reason
        "cancelled" and the text produced so far; feed and nll raise Cancelled. Every such call clears the
        request when it starts, so cancel() never affects a later call. The session stays usable: the sequence
        holds what was evaluated before the stop.
        """
        self._cancel.set()

    def _decode(self, tokens: Sequence[int], all_logits: bool) -> Optional[np.ndarray]:
        n = len(tokens)
        pos = self._cache.reserve(n)
        batch = self._batch
        batch.n_tokens = n
        for k, tok in enumerate(tokens):
            if not 0 <= tok < self.n_vocab:
                raise ValueError(f"token id {tok} outside the vocabulary [0, {self.n_vocab})")
            batch.token[k] = tok
            batch.pos[k] = pos + k
            batch.n_seq_id[k] = 1
            batch.seq_id[k][0] = 0
            batch.logits[k] = all_logits or k == n - 1
        rc = llama_raw.llama_decode(self.ctx, batch)
        if rc != 0:
            self._text = None
            raise RuntimeError(f"llama_decode failed with code {rc} at stream position {self._cache.n_seen}")
        self._cache.advance(n)
        n_out = n if all_logits else 1
        ptr = llama_raw.llama_get_logits(self.ctx)
        out = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
        self._last = out[-1].copy()
        return out

    @_in_use_stream
    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> Iterator[np.ndarray]:
        """Append tokens to the sequence, n_batch at a time; yield each batch's logits (views, copy to keep)."""
        tokens = [int(t) for t in tokens]
        self._text = None
        for start in range(0, len(tokens), self.n_batch):
            yield self._decode(tokens[start:start + self.n_batch], all_logits)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [n, n_vocab] (float32) of every position of a fresh sequence."""
        self.reset()
        tokens = list(tokens)
        out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        row = 0
        for block in self.eval(tokens, all_logits=True):
            out[row:row + len(block)] = block
            row += len(block)
        return out

    def _token_blocks(self, source, path, add_bos: bool = True):
        """(blocks of token ids, fraction-done function or None) for any accepted input (see nll)."""
        if path is not None:
            if source is not None:
                raise TypeError("give either a source or path=, not both")
            source = Path(path)
        if isinstance(source, (bytes, bytearray)):
            source = source.decode("utf-8", errors="replace")
        if isinstance(source, str):
            return iter_token_blocks(self.tokenize, [source], add_bos=add_bos), None
        if isinstance(source, os.PathLike):
            chunks = FileChunks(source)
            return iter_token_blocks(self.tokenize, chunks, add_bos=add_bos), chunks.fraction
        if isinstance(source, np.ndarray) and source.dtype.kind in "iu":
            return [[int(t) for t in source.reshape(-1)]], None
        if isinstance(source, Sequence) and (len(source) == 0 or isinstance(source[0], (int, np.integer))):
            return [[int(t) for t in source]], None
        if isinstance(source, Iterable):
            return iter_token_blocks(self.tokenize, _text_only(source), add_bos=add_bos), None
        raise TypeError(f"expected token ids, text, a pathlib.Path or an iterable of text chunks, not "
                        f"{type(source).__name__}")

    def _batches(self, blocks) -> Iterator[list]:
        """Regroup blocks of ids into lists of n_batch (the last one shorter), holding one batch at a time."""
        buf: list = []
        for block in blocks:
            buf.extend(block)
            while len(buf) >= self.n_batch:
                yield buf[:self.n_batch]
                buf = buf[self.n_batch:]
        if buf:
            yield buf

    @_in_use
    def feed(self, source=None, *, path: Union[str, os.PathLike, None] = None, add_bos: Optional[bool] = None,
             progress: Optional[Callable[[int, Optional[float]], None]] = None) -> int:
        """Append an input of any length to the current sequence (no logits kept); return the tokens fed.

        source: as for nll. add_bos: default True for an empty sequence, else False. progress(tokens_done,
        fraction_done or None) is called after each batch. Raises Cancelled when cancel() is called.
        """
        self._cancel.clear()
        if add_bos is None:
            add_bos = self._cache.n_seen == 0
        blocks, fraction = self._token_blocks(source, path, add_bos)
        done = 0
        for batch in self._batches(blocks):
            if self._cancel.is_set():
                raise Cancelled(f"feed cancelled after {done} tokens")
            self._text = None
            self._decode(batch, all_logits=False)
            done += len(batch)
            if progress:
                progress(done, fraction() if fraction else None)
        return done

    def iter_nll(self, source=None, *, path: Union[str, os.PathLike, None] = None,
                 progress: Optional[Callable[[int, Optional[float]], None]] = None) -> Iterator[np.ndarray]:
        """nll() as a stream of float64 arrays, one per batch (constant memory whatever the input length)."""
        self._cancel.clear()
        blocks, fraction = self._token_blocks(source, path, True)
        return self._iter_nll(blocks, fraction, progress)

    @_in_use_stream
    def _iter_nll(self, blocks, fraction, progress):
        self.reset()
        prev = None      # logits row of the last position of the previous batch
        done = 0
        for batch in self._batches(blocks):
            if self._cancel.is_set():
                raise Cancelled(f"nll cancelled after {done} tokens")
            rows = self._decode(batch, all_logits=True)
            done += len(batch)
            parts = [] if prev is None else [_nll_rows(prev[None, :], batch[:1])]
            parts.append(_nll_rows(rows[:-1], batch[1:]))
            prev = rows[-1].copy()
            out = np.concatenate(parts)
            if len(out):
                yield out
            if progress:
                progress(done, fraction() if fraction else None)
        if done < 2:
            raise ValueError("nll needs at least two tokens")

    def nll(self, source=None, *, path: Union[str, os.PathLike, None] = None,
            progress: Optional[Callable[[int, Optional[float]], None]] = None) -> np.ndarray:
        """Negative log-likelihood [n - 1] of each token given the ones before it, for a fresh sequence.

        source: token ids (a sequence of int or an integer numpy array), text (str: always text, never a file
        name), a file (pathlib.Path / os.PathLike, or the path= keyword for a str path), or an iterable of
        text chunks. Texts and files are tokenised chunk by chunk (lminf_gguf.text, same ids as whole-text
        tokenisation) and evaluated n_batch tokens at a time: memory does not grow with the input beyond the
        result (8 bytes a token; iter_nll streams even that). Raises Cancelled when cancel() is called.
        """
        parts = list(self.iter_nll(source, path=path, progress=progress))
        return np.concatenate(parts) if parts else np.empty(0)

    @_in_use
    def cache_info(self) -> dict:
        """KV cells allocated and in use, the cells bound, and where the stream stands."""
        size, used = self._cache.cells()
        bounded = self.mode not in ("vanilla", "shift")
        info = {
            "mode": self.mode,
            "n_global": self.n_global,
            "n_local": self.n_local,
            "dist_max": self.dist_max if self.mode in CEILING_MODES else None,
            "cells_total": size,
            "cells_used": used,
            "cells_bound": self.n_global + self.n_local + self.n_ubatch if bounded else self._cache.n_ctx,
            "n_tokens": self._cache.n_seen,
            "position": self._cache.pos,
            "rebases": self._cache.n_rebase,
            "shifts": self._cache.n_shift,
            "flash_attn": bool(_lib.llama_lminf_flash_attn(self.ctx)),
        }
        if self.mode == "lminf-topk":
            info.update(store_rows=int(_lib.llama_lminf_topk_store_rows(self.ctx)),
                        store_bytes=int(_lib.llama_lminf_topk_store_bytes(self.ctx)),
                        store_bytes_per_token=self.topk_store_bytes_per_token())
        return info

    @_in_use
    def topk_store_bytes_per_token(self) -> int:
        """lminf-topk: bytes the middle-token store takes per token of the stream (K and V, all top-k layers)."""
        return int(_lib.llama_lminf_topk_row_bytes(self.ctx))

    # -- generation -------------------------------------------------------------------------------------------

    def _sampler(self, temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                 seed: Optional[int]):
        sampler = llama_cpp._internals.LlamaSampler()
        if repeat_penalty != 1.0:
            sampler.add_penalties(self.n_vocab, 64, repeat_penalty, 0.0, 0.0)
        if temperature <= 0:
            sampler.add_greedy()
            return sampler
        sampler.add_top_k(top_k)
        sampler.add_top_p(top_p, 1)
        sampler.add_min_p(min_p, 1)
        sampler.add_temp(temperature)
        sampler.add_dist(seed if seed is not None else llama_raw.LLAMA_DEFAULT_SEED)
        return sampler

    def generate(self, prompt: Union[str, Sequence[int]], max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 seed: Optional[int] = None, stop: Union[str, Iterable[str], None] = None,
                 stream: bool = False, progress: Optional[Callable[[int, int], None]] = None,
                 fresh: bool = True) -> Union[str, Iterator[str]]:
        """Continue a prompt of any length: the text, or an iterator of pieces (stream).

        fresh=False appends the prompt (which may then be empty) to the current sequence instead of starting a
        new one. progress(done, total) is called after each batch of the prompt.
        """
        self._cancel.clear()
        tokens = self._prompt_tokens(prompt, fresh)
        if not tokens and fresh:
            raise ValueError("empty prompt")
        pieces = self._generate(tokens, fresh, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed,
                                _stops(stop), progress, None, {})
        return pieces if stream else "".join(pieces)

    def _prompt_tokens(self, prompt, fresh: bool) -> list:
        if isinstance(prompt, str):
            return self.tokenize(prompt, add_bos=fresh or self._cache.n_seen == 0) if prompt else []
        return [int(t) for t in prompt]

    @_in_use_stream
    def _generate(self, tokens, fresh, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stops,
                  progress, text: Optional[bytes], info: dict) -> Iterator[str]:
        """Evaluate the prompt tokens, then sample; yield text pieces. info gets finish_reason, prompt_tokens,
        completion_tokens. text: the bytes the prompt tokens stand for (chat prefix tracking), or None."""
        info.update(finish_reason="cancelled", prompt_tokens=len(tokens), completion_tokens=0)
        if fresh:
            self.reset()
        prev_text = self._text
        self._text = None
        done = 0
        for start in range(0, len(tokens), self.n_batch):
            if self._cancel.is_set():
                return
            self._decode(tokens[start:start + self.n_batch], all_logits=False)
            done = min(done + self.n_batch, len(tokens))
            if progress:
                progress(done, len(tokens))
        if text is not None:
            self._text = bytearray(text) if fresh else (prev_text + text if prev_text is not None else None)
        if self._last is None:
            raise ValueError("nothing to continue: empty prompt and empty sequence")
        if max_tokens is None or max_tokens <= 0:
            max_tokens = self.n_local if self.mode != "vanilla" else self._cache.n_ctx - self._cache.pos
        sampler = self._sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        cand = llama_cpp._internals.LlamaTokenDataArray(n_vocab=self.n_vocab)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = self._model.vocab
        generated = ""   # text sampled so far
        emitted = 0      # characters of it already yielded
        hold = max((len(s) for s in stops), default=0)
        try:
            for _ in range(max_tokens):
                if self._cancel.is_set():
                    info["finish_reason"] = "cancelled"
                    break
                cand.copy_logits(self._last)
                llama_raw.llama_sampler_apply(sampler.sampler, ctypes.byref(cand.candidates))
                tok = int(cand.candidates_data.id[cand.candidates.selected])
                if llama_raw.llama_vocab_is_eog(vocab, tok):
                    info["finish_reason"] = "stop"
                    break
                llama_raw.llama_sampler_accept(sampler.sampler, tok)
                info["completion_tokens"] += 1
                piece = self._piece(tok)
                generated += decoder.decode(piece)
                if stops:
                    hits = [i for i in (generated.find(s, max(0, emitted - len(s))) for s in stops) if i >= 0]
                    if hits:
                        cut = min(hits)
                        if cut > emitted:
                            yield generated[emitted:cut]
                        info["finish_reason"] = "stop"
                        return
                    # hold back a tail that may be the start of a stop string
                    safe = len(generated)
                    for k in range(1, min(hold, len(generated)) + 1):
                        if any(s.startswith(generated[-k:]) for s in stops):
                            safe = len(generated) - k
                else:
                    safe = len(generated)
                if safe > emitted:
                    yield generated[emitted:safe]
                    emitted = safe
                self._decode([tok], all_logits=False)
                if self._text is not None:
                    self._text += piece
            else:
                info["finish_reason"] = "length"
            generated += decoder.decode(b"", final=True)
            if len(generated) > emitted:
                yield generated[emitted:]
        finally:
            sampler.close()

    # -- OpenAI-style API (the dict shapes of llama-cpp-python's Llama) ---------------------------------------

    @property
    def model_name(self) -> str:
        return os.path.basename(self.model_path)

    def create_completion(self, prompt: Union[str, Sequence[int]], max_tokens: Optional[int] = 16,
                          temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                          repeat_penalty: float = 1.0, seed: Optional[int] = None,
                          stop: Union[str, List[str], None] = None, stream: bool = False, fresh: bool = True,
                          progress: Optional[Callable[[int, int], None]] = None):
        """Text completion with the dict shape of llama_cpp.Llama.create_completion ("text_completion"; with
        stream=True an iterator of chunks, the last one with text "" and the finish_reason).

        The prompt is evaluated in a fresh sequence unless fresh=False (then it is appended to the current
        one; an empty prompt continues it). max_tokens None or <= 0: up to n_local tokens. finish_reason is
        "stop" (end of generation token or stop string), "length", or "cancelled" (see cancel()).
        """
        self._cancel.clear()
        tokens = self._prompt_tokens(prompt, fresh)
        if not tokens and fresh:
            raise ValueError("empty prompt")
        info: dict = {}
        pieces = self._generate(tokens, fresh, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
                                seed, _stops(stop), progress, None, info)
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
        if stream:
            return self._completion_chunks(pieces, info, cid, created)
        text = "".join(pieces)
        return {
            "id": cid, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": info["finish_reason"]}],
            "usage": {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                      "total_tokens": info["prompt_tokens"] + info["completion_tokens"]},
        }

    def _completion_chunks(self, pieces, info, cid, created):
        def chunk(text, finish):
            return {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        for piece in pieces:
            yield chunk(piece, None)
        yield chunk("", info["finish_reason"])

    @_in_use
    def chat_formatter(self):
        """The Jinja2 chat formatter of this model: the GGUF tokenizer.chat_template, or CHATML_TEMPLATE."""
        if self._formatter is None:
            Jinja2ChatFormatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter

            vocab = self._model.vocab

            def tok_text(tok):
                return self._piece(tok).decode("utf-8", errors="replace") if tok >= 0 else ""

            bos, eos = tok_text(llama_raw.llama_vocab_bos(vocab)), tok_text(llama_raw.llama_vocab_eos(vocab))
            template = self.metadata.get("tokenizer.chat_template")
            formatter = None
            if template:
                try:
                    formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)
                    formatter(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
                except Exception:  # a template jinja2 cannot compile or render: use the fallback
                    formatter = None
            self._template_source = "gguf" if formatter is not None else "chatml-fallback"
            self._formatter = formatter or Jinja2ChatFormatter(CHATML_TEMPLATE, eos_token=eos, bos_token=bos)
            self._bos_text = bos
        return self._formatter

    def render_chat(self, messages: List[dict]) -> str:
        """The prompt for messages: the model's chat template (falling back to ChatML when it fails)."""
        formatter = self.chat_formatter()
        try:
            return formatter(messages=messages).prompt
        except Exception:
            if self._template_source != "gguf":
                raise
            Jinja2ChatFormatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter
            return Jinja2ChatFormatter(CHATML_TEMPLATE, eos_token="", bos_token="")(messages=messages).prompt

    def create_chat_completion(self, messages: List[dict], max_tokens: Optional[int] = None,
                               temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, repeat_penalty: float = 1.0, seed: Optional[int] = None,
                               stop: Union[str, List[str], None] = None, stream: bool = False):
        """Chat completion with the dict shape of llama_cpp.Llama.create_chat_completion ("chat.completion";
        with stream=True "chat.completion.chunk" dicts: a first delta {"role": "assistant"}, then {"content"},
        then {} with the finish_reason).

        The conversation stays in the sequence: when the newly rendered prompt extends the text the sequence
        already holds (the previous prompt plus the reply as generated), only the new part is evaluated;
        otherwise the prompt is evaluated from scratch. The KV cache stays bounded however long the history.
        usage.prompt_tokens counts the tokens evaluated by this call (the new part only, when reused). The
        template is the GGUF tokenizer.chat_template, or CHATML_TEMPLATE when there is none or it fails.
        """
        if not messages:
            raise ValueError("messages must not be empty")
        self._cancel.clear()
        prompt = self.render_chat(list(messages))
        data = prompt.encode("utf-8", errors="replace")
        held = self._text
        if held is not None and len(data) > len(held) and data.startswith(bytes(held)):
            tokens = self._model.tokenize(data[len(held):], False, True)
            fresh, text = False, data[len(held):]
        else:
            add_bos = not (self._bos_text and prompt.startswith(self._bos_text))
            tokens = self._model.tokenize(data, add_bos, True)
            fresh, text = True, data
        info: dict = {}
        pieces = self._generate(tokens, fresh, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty,
                                seed, _stops(stop) + ["<|im_end|>"] * (self._template_source != "gguf"), None,
                                text, info)
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
        _convert_completion_to_chat = llama_cpp.llama_chat_format._convert_completion_to_chat
        if stream:
            return _convert_completion_to_chat(self._completion_chunks(pieces, info, cid, created), stream=True)
        reply = "".join(pieces)
        completion = {
            "id": cid, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": [{"text": reply, "index": 0, "logprobs": None, "finish_reason": info["finish_reason"]}],
            "usage": {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                      "total_tokens": info["prompt_tokens"] + info["completion_tokens"]},
        }
        return _convert_completion_to_chat(completion, stream=False)

    # -- state ------------------------------------------------------------------------------------------------

    def model_id(self) -> str:
        """Identity of the model file stored in state files: its size and a sha256 of its first and last MiB."""
        if self._model_id is None:
            h = hashlib.sha256()
            size = os.path.getsize(self.model_path)
            with open(self.model_path, "rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
            self._model_id = f"{size}:{h.hexdigest()}"
        return self._model_id

    def _settings(self) -> dict:
        return {"mode": self.mode, "n_global": self.n_global, "n_local": self.n_local,
                "dist_max": self.dist_max, "type_k": self.type_k, "type_v": self.type_v, "n_vocab": self.n_vocab}

    @_in_use
    def save_state(self, path: Union[str, os.PathLike], extra: Optional[dict] = None) -> int:
        """Write the sequence (the bounded KV cache, the position bookkeeping, the last logits and the text the
        chat API tracks) to a file; return its size in bytes. extra: any JSON-serialisable dict, given back by
        load_state.

        The live cache is re-laid out as load_state lays it out, so that this session and one restored from
        the file continue identically.

        Format: STATE_MAGIC, u32 version, u32 header length, JSON header (model path and id, mode, G, L, C,
        KV types, positions, n_seen, ...), then the last logits row, the tracked text and llama.cpp's
        llama_state_seq_get_data() blob (each preceded by its u64 length), then a sha256 of all that.
        """
        if self.mode == "lminf-topk":
            raise StateError("save_state is not supported in lminf-topk mode: the middle-token store is not saved")
        size = llama_raw.llama_state_seq_get_size(self.ctx, 0)
        blob = (ctypes.c_uint8 * max(size, 1))()
        n = llama_raw.llama_state_seq_get_data(self.ctx, blob, size, 0)
        if size and n == 0:
            raise RuntimeError("llama.cpp could not serialise the sequence")
        # lay the live cache out as load_state will (the cells compacted in order): attention sums run over the
        # cells in cache order, and with quantised weights rounding differences grow, so without this a session
        # continued after save_state could drift from one restored from the file
        if n and llama_raw.llama_state_seq_set_data(self.ctx, blob, n, 0) == 0:
            self.reset()
            raise RuntimeError("llama.cpp could not re-read the sequence it saved; the session was reset")
        c = self._cache
        header = dict(self._settings(), format="lminf_gguf state", model_path=self.model_path,
                      model_id=self.model_id(), pos=c.pos, n_seen=c.n_seen, n_rebase=c.n_rebase,
                      rebase_at=c.rebase_at, has_logits=self._last is not None,
                      has_text=self._text is not None, extra=extra or {})
        hjson = json.dumps(header).encode()
        logits = self._last.astype("<f4").tobytes() if self._last is not None else b""
        text = bytes(self._text) if self._text is not None else b""
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

    @_in_use
    def load_state(self, path: Union[str, os.PathLike]) -> dict:
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
        if header.get("model_id") != self.model_id():
            raise StateError(f"{path} was saved with another model ({header.get('model_path')}); this "
                             f"session runs {self.model_path}")
        mine = self._settings()
        diff = [f"{k} {header.get(k)!r} (session: {v!r})" for k, v in mine.items() if header.get(k) != v]
        if diff:
            raise StateError(f"{path} was saved with other settings: {', '.join(diff)}")
        if self.mode == "vanilla" and header["pos"] > self._cache.n_ctx:
            raise StateError(f"{path} holds {header['pos']} positions, more than n_ctx = {self._cache.n_ctx}")
        if len(logits) != (4 * self.n_vocab if header.get("has_logits") else 0):
            raise StateError(f"{path}: malformed state file (logits size)")

        self.reset()
        if blob:
            buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
            if llama_raw.llama_state_seq_set_data(self.ctx, buf, len(blob), 0) == 0:
                self.reset()
                raise StateError(f"{path}: llama.cpp refused the saved cache; the session was reset to an "
                                 "empty sequence")
        c = self._cache
        c.pos, c.n_seen, c.n_rebase = int(header["pos"]), int(header["n_seen"]), int(header["n_rebase"])
        self._last = np.frombuffer(logits, dtype="<f4").astype(np.float32) if logits else None
        self._text = bytearray(text) if header.get("has_text") else None
        return header.get("extra") or {}


class Cancelled(RuntimeError):
    """feed() or nll() stopped by cancel()."""


class StateError(ValueError):
    """A state file that cannot be loaded into this session (not a state file, corrupt, other model/settings)."""


STATE_MAGIC = b"LMINFST\x00"
STATE_VERSION = 1

# the fallback chat template when the GGUF file has none, or one that cannot be rendered
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")


def _nll_rows(rows: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log softmax(row)[target] per row, in float64, 64 rows at a time (a batch of float64 logits of a large
    vocabulary would be hundreds of MB)."""
    out = np.empty(len(targets))
    for i in range(0, len(targets), 64):
        r = rows[i:i + 64].astype(np.float64)
        top = r.max(axis=1, keepdims=True)
        lse = np.log(np.exp(r - top).sum(axis=1)) + top[:, 0]
        out[i:i + 64] = lse - r[np.arange(len(r)), targets[i:i + 64]]
    return out


def _stops(stop) -> list:
    return [s for s in ([stop] if isinstance(stop, str) else list(stop or [])) if s]


def _text_only(chunks):
    for chunk in chunks:
        if isinstance(chunk, (bytes, bytearray)):
            raise TypeError("text chunks must be str (decode bytes first, or pass a pathlib.Path)")
        yield chunk
