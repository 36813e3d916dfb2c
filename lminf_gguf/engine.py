"""LMInfinite: one GGUF model and one sequence evaluated with LM-Infinite attention in the patched llama.cpp.

Modes
  "lminf"   (default) Λ-mask (n_global sinks + window n_local) with the distance ceiling dist_max, in flash
            attention where the backend has its leading-column KQ bias (CPU; CUDA built with -DGGML_CUDA_FA_KQ_BIAS=ON;
            others fall back to the non-flash path under flash_attn=None), else in the non-flash path; both
            are exact.
  "lminf-topk"  "lminf" plus the top-k middle tokens of the paper's later version: every token's key and value
            is kept in a store outside the KV cache (topk_store_bytes_per_token() bytes per token, on the host or
            memory-mapped in store_dir); in layers >= topk_layer, each decoded token and the last row of each
            prompt ubatch also attend to the topk middle tokens of each KV head that score highest, placed at
            distance topk_dist (default n_local/2). The KV cache stays bounded; the store grows with the stream.
            Both attention paths, as "lminf" (flash attention corrects the last row of each ubatch exactly).
            Interleaved sliding-window models (Gemma 2/3): in the global layers only (the local ones keep their
            window, and have no store). ALiBi models (MPT, BLOOM): nothing is rotated, the chosen keys are biased
            as if at distance topk_dist (-slope * topk_dist).
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

import contextlib
import os
import threading
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from . import _lib, embeddings, generate, inputs, responses, rpc, state
from ._lib import llama_raw
from .cache import SequenceCache
from . import context
from .context import LlamaBatch, LlamaContext, SessionUse, context_params, in_use, in_use_stream, new_context
from .errors import Cancelled, ContextFullError, InvalidInputError, SessionBusyError, StateError
from .models import Model, check_cache_types, lminf_defaults
from .options import MODES, SAMPLING, SESSION, TOPK, Sampling, check_session_args, sampling_keywords
from .responses import CHATML_TEMPLATE
from .sequence import SequenceState

__all__ = ["LMInfinite", "ContextFullError", "Cancelled", "StateError", "SessionBusyError", "InvalidInputError",
           "MODES", "CHATML_TEMPLATE"]


class LMInfinite(responses.OpenAIStyle, state.StateFiles, embeddings.Embeddings, context.CacheInfo):
    """A GGUF model with an unbounded stream of tokens and a bounded KV cache.

    model: path of a GGUF file, hf:OWNER/REPO/FILE.gguf, None for the offline default model (SmolLM2-135M-Instruct
        Q4_1), or a loaded Model to share with other sessions (n_gpu_layers is then the Model's).
    n_global, n_local, dist_max: G, L, C; None takes the GGUF keys lminf.* if present, else G = 10,
        L = the model's trained context, C = L.
    n_ctx: vanilla mode only (default: trained context).
    type_k, type_v: KV cache types ("f16", "f32", "q8_0", ...); q8_0/q4_0 need heads of whole 32-value blocks, and
        a quantised V cache needs flash attention (InvalidInputError otherwise).
    n_threads: CPU threads; default half the cores (options.default_threads: more threads than the cores other
        work leaves free slow llama.cpp down many times).
    flash_attn: None lets llama.cpp decide (on where the backend supports it, also with the distance ceiling,
        which flash attention takes as a bias of the sink columns, and with the top-k middle tokens).
        cache_info()["flash_attn"] says what was chosen.
    rebase_at: largest position handed to llama.cpp before the window is moved down (see cache.py); default
        G + 2L + n_batch in "lminf" mode, 2^24 in "mask" mode (where moving the window changes sink distances).
    topk, topk_layer, topk_dist ("lminf-topk"): middle tokens per KV head, first layer that picks them, distance
        they are attended at (default n_local/2); paper defaults 5, 4, L/2. Needs n_ubatch <= n_local.
    rpc_servers: "HOST:PORT,..." of `lminf rpc-server`s that compute the model's layers (llama.cpp's RPC backend;
        see rpc.py); n_gpu_layers 0 then means all layers. llama-cpp-python's name.
    rpc_timeout: seconds an RPC server may send nothing before the call fails with RemoteServerError (per process,
        rpc.set_timeout; None: unchanged, default 120; 0: no bound). cancel() cuts such a wait short once it has
        lasted 5 s (rpc.DecodeCancel); that fails the model as well.
    store_type, store_dir, store_segment ("lminf-topk"): type of the stored keys and values (f32, f16, q8_0, q4_0;
        q8_0/q4_0 need a head size divisible by 32), a directory for memory-mapped store files (None: memory),
        rows of the first store segment (segment s holds store_segment * 2^min(s, 10) rows, 32 at most).
    topk_block, topk_blocks ("lminf-topk"): block index; with topk_block > 0 (dividing store_segment) a query
        scores blocks of topk_block keys by an upper bound (element-wise min/max) and scans the keys of its
        topk_blocks best blocks per segment only, instead of every middle key.
    topk_units ("lminf-topk" with topk_block > 0): 0 (default) attends the topk best single keys at topk_dist;
        n > 0 attends, of the scanned blocks, the n whose keys take most of the query's softmax, whole and in stream
        order at distances topk_dist ... topk_dist + n*topk_block - 1 (InfLLM's memory units: a passage keeps the
        order of its tokens), and the topk best single keys of the rows outside indexed blocks.
    topk_tail ("lminf-topk"): a prompt's last topk_tail tokens (default 32; 0: none) are decoded one at a time
        (generate, chat, ask, the server),
        since only the last token of each llama_decode call picks middle tokens: each token of a question then
        picks its own. Costs topk_tail decode steps per prompt.
    topk_fa_lse ("lminf-topk", flash attention): True (default) corrects each ubatch's last row with the log-sum-exp
        flash attention returns where the device computes it (the CPU); False takes the second pass over K of the
        devices that do not (the same softmax summed another way; for comparisons).

    What the modules that run a session share with it: seq (sequence.SequenceState: cache bookkeeping, last logits,
    held text and token ids, the cancel request, decode), chat_format (responses.ChatFormat), use (the
    context.SessionUse that in_use methods run under), model (models.Model; model.llama: llama-cpp-python's
    LlamaModel) and ctx (the llama_context pointer).
    """

    def __init__(self, model: Union[str, os.PathLike, Model, None] = None, *, n_global: Optional[int] = None,
                 n_local: Optional[int] = None, dist_max: Optional[int] = None, mode: str = "lminf",
                 n_ctx: Optional[int] = None, n_batch: int = SESSION.n_batch, n_ubatch: Optional[int] = None,
                 n_threads: Optional[int] = None, n_gpu_layers: int = 0, type_k: str = SESSION.type_k,
                 type_v: str = SESSION.type_v, flash_attn: Optional[bool] = None, rebase_at: Optional[int] = None,
                 topk: int = TOPK.k, topk_layer: int = TOPK.layer_first, topk_dist: Optional[int] = None,
                 store_type: str = TOPK.store_type, store_dir: Union[str, os.PathLike, None] = None,
                 store_segment: int = TOPK.seg_rows, topk_block: int = TOPK.block, topk_blocks: int = TOPK.n_blocks,
                 topk_units: int = TOPK.n_units, topk_tail: int = TOPK.tail, topk_fa_lse: bool = True,
                 rpc_servers: Optional[str] = None, rpc_timeout: Optional[float] = None, verbose: bool = False):
        # what this session owns (its model unless shared, context, batch), freed in reverse order by _free
        self._owned = contextlib.ExitStack()
        self._cancel = threading.Event()
        self._rpc_cancel = rpc.DecodeCancel(None)  # cancel() cuts a wait for a stalled RPC server (set below)
        # the rule for calls (context.SessionUse): one thread at a time; close() from any thread
        self.use = SessionUse(self._free, self._cancel)
        self.verbose = verbose  # llama.cpp's log on stderr during this session's calls (lminf_gguf._lib.verbosity)
        check_session_args(mode=mode, n_global=n_global, n_local=n_local, dist_max=dist_max, n_batch=n_batch,
                           n_ubatch=n_ubatch, n_ctx=n_ctx, type_k=type_k, type_v=type_v, topk=topk,
                           topk_layer=topk_layer, topk_dist=topk_dist, store_type=store_type, store_dir=store_dir,
                           store_segment=store_segment, topk_block=topk_block, topk_blocks=topk_blocks,
                           topk_units=topk_units, topk_tail=topk_tail, flash_attn=flash_attn)

        # a shared Model stays open when this session closes; one loaded here is this session's own
        self._own_model = not isinstance(model, Model)
        if rpc_servers and MODES[mode].topk:
            raise InvalidInputError("lminf-topk does not run over RPC servers (its store reads the cache here)")
        self.model = model if not self._own_model else Model(
            model, n_gpu_layers=n_gpu_layers, rpc_servers=rpc_servers, rpc_timeout=rpc_timeout, verbose=verbose)
        if self._own_model:
            self._owned.callback(self.model.close)
        if self.model.llama is None:
            raise InvalidInputError("the shared Model is closed")
        self.model.check_servers()
        self._rpc_cancel = rpc.DecodeCancel(self.model.rpc_servers)
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
        check_cache_types(self.metadata, type_k, type_v)
        self.chat_format: Optional[responses.ChatFormat] = None  # the chat template, read on first use

        cparams = context_params(n_batch, self.n_ubatch, n_threads, type_k, type_v, flash_attn)

        topk_params = None
        self.topk_tail = topk_tail if MODES[mode].topk else 0  # generate.prompt_blocks
        if MODES[mode].topk:
            if topk_layer >= self.model.n_layer:
                raise InvalidInputError(f"topk_layer must be below the model's {self.model.n_layer} layers, "
                                        f"not {topk_layer}")
            if self.n_ubatch > self.n_local:
                raise InvalidInputError(f"lminf-topk needs n_ubatch ({self.n_ubatch}) <= n_local ({self.n_local})")
            self.topk, self.topk_layer = topk, topk_layer
            self.topk_dist = topk_dist or max(1, self.n_local // 2)
            self.store_type = store_type
            topk_params = context.topk_params(topk, topk_layer, self.topk_dist, store_type, store_segment, topk_block,
                                              topk_blocks, store_dir, topk_fa_lse, topk_units)
        with self.model.context_lock, _lib.verbosity(verbose):
            _lib.last_errors()
            ctx = new_context(self, cparams, n_ctx, topk_params)
        if not ctx:
            reason = next((line.split(": ", 1)[-1] for line in _lib.last_errors() if "LM-Infinite" in line), None)
            if reason:  # llama.cpp's refusal of this model or these parameters, in its words
                raise InvalidInputError(f"{self.model_path}: {reason}")
            raise RuntimeError(f"llama.cpp could not create a {mode} context for {self.model_path} "
                               "(run with verbose=True for its log)")
        self._context = LlamaContext(ctx, self.model.context_lock)
        self._owned.callback(self._context.close)
        batch = LlamaBatch(n_batch)
        self._owned.callback(batch.close)
        # llama.cpp may grant less than asked (n_batch is capped at n_ctx, e.g. a small vanilla n_ctx or a small
        # trained context) and aborts the process on a batch above what it granted: never hand it more
        self.n_batch = min(self.n_batch, int(llama_raw.llama_n_batch(ctx)))
        self.n_ubatch = min(self.n_ubatch, int(llama_raw.llama_n_ubatch(ctx)), self.n_batch)
        n_batch = self.n_batch

        cache = SequenceCache.for_session(ctx, MODES[mode], self.n_global, self.n_local, n_batch, rebase_at)
        # the sequence's state as the other modules use it (sequence.py)
        self.seq = SequenceState(self._context, batch, cache, self.n_vocab, self.model, self._rpc_cancel, self._cancel)

    # -- lifetime ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context (and the model, unless it is a shared Model). Safe from any thread: a call in progress
        is cancelled and the context is freed when it returns; later calls raise RuntimeError."""
        use = getattr(self, "use", None)  # None: __init__ failed before it (called from __del__)
        if use is not None:
            self.cancel()  # also cuts a wait for a stalled RPC server (use.close() cancels the rest)
            use.close()

    def _free(self) -> None:
        self._owned.close()  # the batch, the context, then the model if it is this session's own

    @property
    def ctx(self):
        """The llama_context pointer, for llama.cpp's functions (None once the session is freed)."""
        return self._context.ctx

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    # -- tokens -----------------------------------------------------------------------------------------------

    @in_use
    def tokenize(self, text: Union[str, bytes], add_bos: bool = True, special: bool = False) -> list[int]:
        if isinstance(text, str):
            text = text.encode("utf-8", errors="replace")
        return self.model.llama.tokenize(text, add_bos, special)

    @in_use
    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.model.llama.detokenize(inputs.token_ids(self.n_vocab, tokens)).decode("utf-8", errors="replace")

    # -- evaluation -------------------------------------------------------------------------------------------

    @in_use
    def reset(self) -> None:
        """Start a fresh sequence."""
        self.seq.reset()

    def cancel(self) -> None:
        """Ask the call in progress (from another thread, or a signal handler) to stop at the next token or batch.

        Generation (generate, create_completion, create_chat_completion) then ends early with finish_reason
        "cancelled" and the text produced so far; feed and nll raise Cancelled. Every such call clears the
        request when it starts, so cancel() never affects a later call. The session stays usable: the sequence
        holds what was evaluated before the stop.
        """
        self._cancel.set()
        self._rpc_cancel.cancel()

    @in_use_stream
    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> Iterator[np.ndarray]:
        """Append tokens to the sequence, n_batch at a time; yield each batch's logits (views, copy to keep)."""
        tokens = inputs.token_ids(self.n_vocab, tokens)
        self.seq.forget_text()
        for start in range(0, len(tokens), self.n_batch):
            yield self.seq.decode(tokens[start:start + self.n_batch], all_logits)

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

    @in_use
    def feed(self, source=None, *, path: Union[str, os.PathLike, None] = None, add_bos: Optional[bool] = None,
             progress: Optional[Callable[[int, Optional[float]], None]] = None) -> int:
        """Append an input of any length to the current sequence (no logits kept); return the tokens fed.

        source: as for nll. add_bos: default True for an empty sequence, else False. progress(tokens_done,
        fraction_done or None) is called after each batch. Raises Cancelled when cancel() is called.
        """
        self._cancel.clear()
        if add_bos is None:
            add_bos = self.seq.cache.n_seen == 0
        blocks, fraction = inputs.token_blocks(self, source, path, add_bos)
        return inputs.feed(self, blocks, fraction, progress)

    def iter_nll(self, source=None, *, path: Union[str, os.PathLike, None] = None,
                 progress: Optional[Callable[[int, Optional[float]], None]] = None) -> Iterator[np.ndarray]:
        """nll() as a stream of float64 arrays, one per batch (constant memory whatever the input length)."""
        self._cancel.clear()
        blocks, fraction = inputs.token_blocks(self, source, path, True)
        return self._iter_nll(blocks, fraction, progress)

    @in_use_stream
    def _iter_nll(self, blocks, fraction, progress):
        yield from inputs.nll_stream(self, blocks, fraction, progress)

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

    # -- generation -------------------------------------------------------------------------------------------

    @sampling_keywords(SAMPLING)
    def generate(self, prompt: Union[str, Sequence[int]], max_tokens: int = 128, *,
                 stop: Union[str, Iterable[str], None] = None, stream: bool = False,
                 progress: Optional[Callable[[int, int], None]] = None, fresh: bool = True,
                 **sampling) -> Union[str, Iterator[str]]:
        """Continue a prompt of any length: the text, or an iterator of pieces (stream).

        fresh=False appends the prompt (which may then be empty) to the current sequence instead of starting a
        new one. progress(done, total) is called after each batch of the prompt. sampling: the keywords of
        options.Sampling, with llama-cpp-python's names and defaults: temperature, top_k, top_p, min_p,
        typical_p, repeat_penalty, frequency_penalty and presence_penalty (OpenAI's, over the last 64 tokens),
        seed, logit_bias ({token id: bias}) and grammar (a llama-cpp-python LlamaGrammar).
        """
        self._cancel.clear()
        tokens = self.prompt_tokens(prompt, fresh)
        if not tokens and fresh:
            raise InvalidInputError("empty prompt")
        sampling = self.sampling_settings(sampling)
        pieces = self.generate_pieces(tokens, fresh, max_tokens, sampling, generate.stop_list(stop), progress, None, {})
        return pieces if stream else "".join(pieces)

    def sampling_settings(self, given: dict, base: Sampling = SAMPLING) -> dict:
        """The sampling keywords given (options.Sampling's) over base's defaults, checked (Sampling.checked) and
        against this session's vocabulary (generate.check_sampling): generate.pieces' sampling keywords."""
        return generate.check_sampling(self, Sampling.checked(base, **given).kwargs())

    def prompt_tokens(self, prompt: Union[str, Sequence[int]], fresh: bool) -> list:
        """A prompt's token ids: text tokenised (with a BOS when it starts a sequence), ids checked."""
        if isinstance(prompt, str):
            return self.tokenize(prompt, add_bos=fresh or self.seq.cache.n_seen == 0) if prompt else []
        return inputs.token_ids(self.n_vocab, prompt)

    @in_use_stream
    def generate_pieces(self, tokens, fresh, max_tokens, sampling: dict, stops, progress, text: Optional[bytes],
                        info: dict, logprobs: Optional[int] = None, prompt_logprobs: bool = False) -> Iterator[str]:
        """generate.pieces() as a use of this session (it lasts until the stream ends or is closed): the text pieces
        of a reply to prompt tokens (prompt_tokens), with sampling_settings' keywords and stop strings; info gets the
        finish reason, token counts and token records (see generate.pieces). The generation calls run on it."""
        yield from generate.pieces(self, tokens, fresh, max_tokens, stops=stops, progress=progress, text=text,
                                   info=info, logprobs=logprobs, prompt_logprobs=prompt_logprobs, **sampling)
