"""What a session accepts as input, turned into token ids: token ids (checked against the vocabulary before they
reach llama.cpp), text, files and iterables of text chunks (tokenised chunk by chunk, lminf_gguf.text), regrouped
into batches; and the negative log-likelihood of the rows of logits."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np

from ._lib import llama_raw
from .errors import Cancelled, InvalidInputError, InvalidTypeError
from .text import FileChunks, iter_token_blocks


def token_ids(n_vocab: int, tokens) -> List[int]:
    """Token ids as ints, each checked against the vocabulary: llama.cpp aborts the process on an id outside it
    (an uncaught std::out_of_range), so every id is checked here before it reaches llama.cpp."""
    ids = []
    for tok in tokens:
        if isinstance(tok, (bool, float)) or not isinstance(tok, (int, np.integer)):
            raise InvalidInputError(f"token ids must be integers, not {type(tok).__name__} ({tok!r})")
        if not 0 <= tok < n_vocab:
            raise InvalidInputError(f"token id {tok} outside the vocabulary [0, {n_vocab})")
        ids.append(int(tok))
    return ids


def token_blocks(llm, source, path, add_bos: bool = True):
    """(blocks of token ids, fraction-done function or None) for any accepted input (see nll)."""
    if path is not None:
        if source is not None:
            raise InvalidTypeError("give either a source or path=, not both")
        source = Path(path)
    if isinstance(source, (bytes, bytearray)):
        source = source.decode("utf-8", errors="replace")
    if isinstance(source, str):
        return iter_token_blocks(llm.tokenize, [source], add_bos=add_bos), None
    if isinstance(source, os.PathLike):
        chunks = FileChunks(source)
        return iter_token_blocks(llm.tokenize, chunks, add_bos=add_bos), chunks.fraction
    if isinstance(source, np.ndarray) and source.dtype.kind in "iu":
        return [token_ids(llm.n_vocab, source.reshape(-1))], None
    if isinstance(source, Sequence) and (len(source) == 0 or isinstance(source[0], (int, np.integer))):
        return [token_ids(llm.n_vocab, source)], None
    if isinstance(source, Iterable):
        return iter_token_blocks(llm.tokenize, text_only(source), add_bos=add_bos), None
    raise InvalidTypeError(f"expected token ids, text, a pathlib.Path or an iterable of text chunks, not "
                    f"{type(source).__name__}")


def batches(blocks, n_batch: int) -> Iterator[list]:
    """Regroup blocks of ids into lists of n_batch (the last one shorter), holding one batch at a time."""
    buf: list = []
    for block in blocks:
        buf.extend(block)
        while len(buf) >= n_batch:
            yield buf[:n_batch]
            buf = buf[n_batch:]
    if buf:
        yield buf


def text_only(chunks):
    for chunk in chunks:
        if isinstance(chunk, (bytes, bytearray)):
            raise InvalidTypeError("text chunks must be str (decode bytes first, or pass a pathlib.Path)")
        yield chunk


def nll_rows(rows: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log softmax(row)[target] per row, in float64, 64 rows at a time (a batch of float64 logits of a large
    vocabulary would be hundreds of MB)."""
    out = np.empty(len(targets))
    for i in range(0, len(targets), 64):
        r = rows[i:i + 64].astype(np.float64)
        top = r.max(axis=1, keepdims=True)
        lse = np.log(np.exp(r - top).sum(axis=1)) + top[:, 0]
        out[i:i + 64] = lse - r[np.arange(len(r)), targets[i:i + 64]]
    return out


class _Consumed:
    """The fraction of an input consumed so far: the fraction of the file read (chunks are read ahead, a whole
    small file at once) scaled by the share of the tokens read so far that have been evaluated."""

    def __init__(self, blocks, fraction):
        self.fraction, self.seen = fraction, 0
        self.blocks = self._count(blocks)

    def _count(self, blocks):
        for block in blocks:
            self.seen += len(block)
            yield block

    def __call__(self, done: int) -> Optional[float]:
        read = self.fraction() if self.fraction else None
        return None if read is None or not self.seen else read * min(1.0, done / self.seen)


def feed(llm, blocks, fraction, progress) -> int:
    """Evaluate blocks of ids in batches, no logits kept (LMInfinite.feed); the tokens fed."""
    done, consumed = 0, _Consumed(blocks, fraction)
    for batch in batches(consumed.blocks, llm.n_batch):
        if llm.seq.cancel.is_set():
            raise Cancelled(f"feed cancelled after {done} tokens")
        llm.seq.forget_text()
        llm.seq.decode(batch, all_logits=False)
        done += len(batch)
        if progress:
            progress(done, consumed(done))
    return done


def nll_stream(llm, blocks, fraction, progress) -> Iterator[np.ndarray]:
    """The NLL of each token after the first, a float64 array per batch, for a fresh sequence (LMInfinite.nll)."""
    llm.reset()
    prev = None      # logits row of the last position of the previous batch
    done, consumed = 0, _Consumed(blocks, fraction)
    for batch in batches(consumed.blocks, llm.n_batch):
        if llm.seq.cancel.is_set():
            raise Cancelled(f"nll cancelled after {done} tokens")
        rows = llm.seq.decode(batch, all_logits=True)
        done += len(batch)
        parts = [] if prev is None else [nll_rows(prev[None, :], batch[:1])]
        parts.append(nll_rows(rows[:-1], batch[1:]))
        prev = rows[-1].copy()
        out = np.concatenate(parts)
        if len(out):
            yield out
        if progress:
            progress(done, consumed(done))
    if done < 2:
        raise InvalidInputError("nll needs at least two tokens")


def piece(llm, token: int) -> bytes:
    """The bytes of one token (llama.cpp's token_to_piece, no special-token rendering)."""
    # llama-cpp-python's LlamaModel.token_to_piece returns its whole buffer, NUL padding included
    vocab = llm.model.llama.vocab
    buf = ctypes.create_string_buffer(64)
    n = llama_raw.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_raw.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return buf.raw[:n]
