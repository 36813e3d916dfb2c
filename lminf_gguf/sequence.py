"""The one sequence of a session, as the modules that run it share it (LMInfinite.seq): the cache bookkeeping, the
logits after the last token, the text and token ids the sequence holds (chat reuse), the cancel request, and
decode(). The engine creates it with the session's context; generate, inputs, responses, state and ask use it."""

from __future__ import annotations

import threading
from typing import Optional, Sequence

import numpy as np

from ._lib import llama_raw
from .cache import SequenceCache
from .context import LlamaBatch, LlamaContext, fill_batch


class SequenceState:
    """What the session's sequence holds, and decode() to extend it.

    cache: the position bookkeeping (cache.SequenceCache). last: the logits after the last evaluated token (None
    for an empty sequence). text, tokens: the text the sequence holds and its token ids as evaluated, when known
    (the chat API's prefix reuse; both None otherwise: whatever evaluates tokens without text calls forget_text).
    cancel: set by LMInfinite.cancel(); each call clears it when it starts and stops when it finds it set.
    """

    def __init__(self, context: LlamaContext, batch: LlamaBatch, cache: SequenceCache, n_vocab: int, model,
                 rpc_cancel, cancel: threading.Event):
        self.cache = cache
        self.cancel = cancel
        self.last: Optional[np.ndarray] = None
        self.text: Optional[bytearray] = None
        self.tokens: Optional[list] = None
        self.n_vocab = n_vocab
        self._context, self._batch = context, batch
        self._model, self._rpc_cancel = model, rpc_cancel   # models.Model (its RPC servers), rpc.DecodeCancel

    def reset(self) -> None:
        """An empty sequence (the cache cleared)."""
        self.cache.reset()
        self.last = None
        self.forget_text()

    def forget_text(self) -> None:
        """The sequence no longer holds a known text (tokens were evaluated without one)."""
        self.text = self.tokens = None

    def decode(self, tokens: Sequence[int], all_logits: bool) -> np.ndarray:
        """Append tokens (at most the batch size) to the sequence; the logits [n or 1, n_vocab] of all of them or of
        the last (a view into llama.cpp's buffer, valid until the next decode: copy to keep). last gets a copy of
        the last row."""
        n = len(tokens)
        ctx, batch = self._context.ctx, self._batch.batch
        pos = self.cache.reserve(n)
        fill_batch(batch, tokens, pos, self.n_vocab, all_logits)
        self._model.check_servers()
        with self._rpc_cancel.decoding():
            rc = llama_raw.llama_decode(ctx, batch)
            # the backends (RPC answers too) finish here, so the check below sees a server that failed in this decode
            llama_raw.llama_synchronize(ctx)
        self._model.check_servers()  # a server that went away during the call: zeros came back, not an abort
        if rc != 0:
            self.forget_text()
            raise RuntimeError(f"llama_decode failed with code {rc} at stream position {self.cache.n_seen}")
        self.cache.advance(n)
        n_out = n if all_logits else 1
        out = np.ctypeslib.as_array(llama_raw.llama_get_logits(ctx), shape=(n_out, self.n_vocab))
        self.last = out[-1].copy()
        return out
