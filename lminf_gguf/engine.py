"""LMInfinite: one GGUF model and one sequence evaluated with LM-Infinite attention in the patched llama.cpp.

Modes
  "lminf"   (default) Λ-mask (n_global sinks + window n_local) with the distance ceiling dist_max; flash
            attention is turned off because the ceiling needs the attention scores.
  "mask"    Λ-mask only (no ceiling); flash attention as requested.
  "vanilla" unchanged llama.cpp with an n_ctx cache; streams longer than n_ctx raise ContextFullError.

Thread safety: an LMInfinite object holds one llama.cpp context and must be used by one thread at a time;
create one object per thread (each loads its own copy of the model).
"""

from __future__ import annotations

import codecs
import ctypes
import os
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from . import _lib
from ._lib import llama_cpp, llama_raw
from .cache import ContextFullError, SequenceCache
from .models import default_model_path, lminf_defaults

MODES = ("vanilla", "mask", "lminf")

# positions up to 2^24 are exact in float32
MASK_REBASE_AT = 1 << 24

KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}

_FLASH = {None: "LLAMA_FLASH_ATTN_TYPE_AUTO", True: "LLAMA_FLASH_ATTN_TYPE_ENABLED",
          False: "LLAMA_FLASH_ATTN_TYPE_DISABLED"}

__all__ = ["LMInfinite", "ContextFullError", "MODES"]


class LMInfinite:
    """A GGUF model with an unbounded stream of tokens and a bounded KV cache.

    model: path of a GGUF file, or None for the offline default model (SmolLM2-135M-Instruct Q4_1).
    n_global, n_local, dist_max: G, L, C; None takes the GGUF keys lminf.* if present, else G = 10,
        L = the model's trained context, C = L.
    n_ctx: vanilla mode only (default: trained context).
    type_k, type_v: KV cache types ("f16", "f32", "q8_0", ...).
    flash_attn: None lets llama.cpp decide; forced off in "lminf" mode.
    rebase_at: largest position handed to llama.cpp before the window is moved down (see cache.py); default
        G + 2L + n_batch in "lminf" mode, 2^24 in "mask" mode (where moving the window changes sink distances).
    """

    def __init__(self, model: Optional[str] = None, *, n_global: Optional[int] = None,
                 n_local: Optional[int] = None, dist_max: Optional[int] = None, mode: str = "lminf",
                 n_ctx: Optional[int] = None, n_batch: int = 512, n_ubatch: Optional[int] = None,
                 n_threads: Optional[int] = None, n_gpu_layers: int = 0, type_k: str = "f16",
                 type_v: str = "f16", flash_attn: Optional[bool] = None, rebase_at: Optional[int] = None,
                 verbose: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        for name, value, low in (("n_global", n_global, 0), ("n_local", n_local, 1), ("dist_max", dist_max, 1),
                                 ("n_batch", n_batch, 1), ("n_ubatch", n_ubatch, 1), ("n_ctx", n_ctx, 1)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
        for name, value in (("type_k", type_k), ("type_v", type_v)):
            if value not in KV_TYPES:
                raise ValueError(f"{name} must be one of {', '.join(KV_TYPES)}, not {value!r}")

        _lib.set_verbose(verbose)
        self.model_path = str(model) if model is not None else default_model_path()
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"model file not found: {self.model_path}")

        mparams = llama_raw.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        try:
            self._model = llama_cpp._internals.LlamaModel(path_model=self.model_path, params=mparams,
                                                           verbose=verbose)
        except ValueError as e:
            raise ValueError(f"cannot load model {self.model_path}: not a valid GGUF model for this "
                             f"llama.cpp ({e})") from None

        self.metadata = self._model.metadata()
        self.n_ctx_train = self._model.n_ctx_train()
        self.n_vocab = self._model.n_vocab()
        defaults = lminf_defaults(self.metadata, self.n_ctx_train)
        self.mode = mode
        self.n_global = defaults["n_global"] if n_global is None else n_global
        self.n_local = defaults["n_local"] if n_local is None else n_local
        self.dist_max = dist_max or defaults["dist_max"] or self.n_local
        self.n_batch = n_batch
        self.n_ubatch = min(n_ubatch or n_batch, n_batch)

        cparams = llama_raw.llama_context_default_params()
        cparams.n_batch = n_batch
        cparams.n_ubatch = self.n_ubatch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = n_threads or os.cpu_count() or 1
        cparams.type_k = KV_TYPES[type_k]
        cparams.type_v = KV_TYPES[type_v]
        cparams.flash_attn_type = getattr(llama_raw, _FLASH[flash_attn])
        cparams.no_perf = True

        if mode == "vanilla":
            cparams.n_ctx = n_ctx or self.n_ctx_train
            ctx = llama_raw.llama_init_from_model(self._model.model, cparams)
        else:
            ceiling = self.dist_max if mode == "lminf" else 0
            ctx = _lib.llama_init_from_model_lminf(self._model.model, cparams, self.n_global, self.n_local,
                                                   ceiling)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a {mode} context for {self.model_path} "
                               "(run with verbose=True for its log)")
        self.ctx = ctx
        self._batch = llama_raw.llama_batch_init(n_batch, 0, 1)

        # rebasing is exact only with the ceiling: in "mask" mode sinks keep their true, growing distance, so the
        # window is moved only where float32 RoPE angles would otherwise lose all precision
        min_rebase = self.n_global + self.n_local + n_batch
        default_rebase = min_rebase + self.n_local if mode == "lminf" else MASK_REBASE_AT
        self._cache = SequenceCache(
            ctx=ctx, bounded=mode != "vanilla", n_global=self.n_global, n_local=self.n_local,
            n_ctx=llama_raw.llama_n_ctx(ctx), rebase_at=max(rebase_at or default_rebase, min_rebase))

    # -- lifetime ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            llama_raw.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            llama_raw.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "_model", None) is not None:
            self._model.close()
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    # -- tokens -----------------------------------------------------------------------------------------------

    def tokenize(self, text: Union[str, bytes], add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, str):
            text = text.encode("utf-8", errors="replace")
        return self._model.tokenize(text, add_bos, special)

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

    def reset(self) -> None:
        """Start a fresh sequence."""
        self._cache.reset()

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
            raise RuntimeError(f"llama_decode failed with code {rc} at stream position {self._cache.n_seen}")
        self._cache.advance(n)
        n_out = n if all_logits else 1
        ptr = llama_raw.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> Iterator[np.ndarray]:
        """Append tokens to the sequence, n_batch at a time; yield each batch's logits (views, copy to keep)."""
        tokens = [int(t) for t in tokens]
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

    def nll(self, tokens: Union[str, Sequence[int]]) -> np.ndarray:
        """Negative log-likelihood [n - 1] of each token given the ones before it, for a fresh sequence.

        Streams n_batch tokens at a time: memory does not grow with the stream length beyond the result.
        """
        if isinstance(tokens, str):
            tokens = self.tokenize(tokens)
        tokens = [int(t) for t in tokens]
        if len(tokens) < 2:
            raise ValueError("nll needs at least two tokens")
        self.reset()
        out = np.empty(len(tokens) - 1, dtype=np.float64)
        start = 0
        for block in self.eval(tokens, all_logits=True):
            n = len(block)
            targets = tokens[start + 1:start + n + 1]
            rows = block[:len(targets)].astype(np.float64)
            top = rows.max(axis=1, keepdims=True)
            lse = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
            out[start:start + len(targets)] = lse - rows[np.arange(len(targets)), targets]
            start += n
        return out

    def cache_info(self) -> dict:
        """KV cells allocated and in use, the cells bound, and where the stream stands."""
        size, used = self._cache.cells()
        bounded = self.mode != "vanilla"
        return {
            "mode": self.mode,
            "n_global": self.n_global,
            "n_local": self.n_local,
            "dist_max": self.dist_max if self.mode == "lminf" else None,
            "cells_total": size,
            "cells_used": used,
            "cells_bound": self.n_global + self.n_local + self.n_ubatch if bounded else self._cache.n_ctx,
            "n_tokens": self._cache.n_seen,
            "position": self._cache.pos,
            "rebases": self._cache.n_rebase,
        }

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
                 stream: bool = False, progress: Optional[Callable[[int, int], None]] = None
                 ) -> Union[str, Iterator[str]]:
        """Continue a prompt of any length in a fresh sequence: the text, or an iterator of pieces (stream).

        progress(done, total) is called after each batch of the prompt.
        """
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise ValueError("empty prompt")
        pieces = self._generate(tokens, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed,
                                [stop] if isinstance(stop, str) else list(stop or []), progress)
        return pieces if stream else "".join(pieces)

    def _generate(self, tokens, max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, seed, stops,
                  progress):
        self.reset()
        done = 0
        for block in self.eval(tokens):
            done = min(done + self.n_batch, len(tokens))
            if progress:
                progress(done, len(tokens))
        sampler = self._sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = self._model.vocab
        text = ""
        holder = _ContextRef(self.ctx)
        try:
            for _ in range(max_tokens):
                tok = sampler.sample(holder, -1)
                if llama_raw.llama_vocab_is_eog(vocab, tok):
                    break
                sampler.accept(tok)
                piece = decoder.decode(self._piece(tok))
                text += piece
                hit = next((s for s in stops if s and s in text), None)
                if hit is not None:
                    cut = text.index(hit)
                    tail = piece[:max(0, len(piece) - (len(text) - cut))]
                    if tail:
                        yield tail
                    return
                if piece:
                    yield piece
                self._decode([tok], all_logits=False)
            rest = decoder.decode(b"", final=True)
            if rest:
                yield rest
        finally:
            sampler.close()


class _ContextRef:
    """The attribute LlamaSampler.sample() reads from a context wrapper."""

    def __init__(self, ctx):
        self.ctx = ctx

