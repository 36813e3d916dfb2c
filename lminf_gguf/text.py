"""Tokenise inputs of any size without holding them whole: a file, or an iterable of text chunks.

The text is tokenised piece by piece, cut only where a token boundary is certain, so that the ids equal those
of tokenising the whole text at once (BOS, if the vocabulary adds one, only at the very start):

- a cut goes after a newline that is followed by a non-space character, else before a single space between two
  non-space characters (pre-tokenisers of BPE vocabularies never join across these), else between a letter or
  digit and another kind of character, else at either end of a whitespace run;
- every cut is verified: the text around it (``window`` characters each side) must tokenise to the same ids as
  its two halves tokenised apart; a candidate that fails is skipped;
- the text after the last cut (the tail) stays pending and is tokenised again together with the next chunk.

Memory is bounded by ``chunk_chars`` plus the pending tail, except for text with no verifiable cut in
``max_pending`` characters (e.g. a vocabulary whose tokeniser adds a space prefix to every call, such as some
SentencePiece models): there the reader cuts at the best candidate anyway, and ids near such a cut may differ
from whole-text tokenisation.
"""

from __future__ import annotations

import codecs
import os
import re
from typing import Callable, Iterable, Iterator, List, Optional, Union

__all__ = ["FileChunks", "iter_token_blocks", "tokenize_chunks"]

Tokenize = Callable[[str, bool], List[int]]

# after a newline, before non-space  |  before one space between non-spaces
_NEWLINE_CUT = re.compile(r"(?<=\n)(?=\S)")
_SPACE_CUT = re.compile(r"(?<=\S)(?= \S)")
_CLASS_CUT = re.compile(r"(?<=\w)(?=[^\w\s])|(?<=[^\w\s])(?=\w)")
_RUN_CUT = re.compile(r"(?<=\S)(?=\s)|(?<=\s)(?=\S)")


class FileChunks:
    """Iterate over a text file as str chunks (UTF-8, undecodable bytes replaced), reading `chunk_bytes` at a
    time; `bytes_read` and `size` tell how far it is."""

    def __init__(self, path: Union[str, os.PathLike], chunk_bytes: int = 1 << 20):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"text file not found: {self.path}")
        self.size = os.path.getsize(self.path)
        self.chunk_bytes = chunk_bytes
        self.bytes_read = 0

    def __iter__(self) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.bytes_read = 0
        with open(self.path, "rb") as f:
            while True:
                data = f.read(self.chunk_bytes)
                if not data:
                    break
                self.bytes_read += len(data)
                text = decoder.decode(data)
                if text:
                    yield text
        rest = decoder.decode(b"", final=True)
        if rest:
            yield rest

    def fraction(self) -> Optional[float]:
        return self.bytes_read / self.size if self.size else None


def _verified(tokenize: Tokenize, text: str, cut: int, window: int) -> bool:
    a, b = max(0, cut - window), min(len(text), cut + window)
    return tokenize(text[a:b], False) == tokenize(text[a:cut], False) + tokenize(text[cut:b], False)


def _find_cut(tokenize: Tokenize, text: str, lo: int, hi: int, window: int, tries: int = 8) -> Optional[int]:
    """The last verified safe cut in text[lo:hi] (searched backwards), or None."""
    for pattern in (_NEWLINE_CUT, _SPACE_CUT, _CLASS_CUT, _RUN_CUT):
        candidates = [m.start() for m in pattern.finditer(text, lo, hi)]
        for cut in reversed(candidates[-tries:]):
            if lo < cut < hi and _verified(tokenize, text, cut, window):
                return cut
    return None


def iter_token_blocks(tokenize: Tokenize, chunks: Iterable[str], *, add_bos: bool = True,
                      chunk_chars: int = 1 << 16, window: int = 256,
                      max_pending: Optional[int] = None) -> Iterator[List[int]]:
    """Token ids of the concatenated chunks, as a series of lists (possibly empty) whose concatenation equals
    ``tokenize("".join(chunks), add_bos)``.

    tokenize(text, add_bos) -> list of ids, e.g. LMInfinite.tokenize. A text is tokenised once a pending piece
    holds chunk_chars + window characters; max_pending (default 16 * chunk_chars) bounds the pending text.
    """
    if chunk_chars < 1 or window < 1:
        raise ValueError("chunk_chars and window must be >= 1")
    max_pending = max_pending or 16 * chunk_chars
    pending = ""
    first = True
    for chunk in chunks:
        if not isinstance(chunk, str):
            raise TypeError(f"text chunks must be str, not {type(chunk).__name__}")
        pending += chunk
        while len(pending) >= chunk_chars + 2 * window:
            hi = len(pending) - window
            cut = _find_cut(tokenize, pending, max(window, hi - chunk_chars), hi, window)
            if cut is None:
                if len(pending) < max_pending:
                    break  # wait for more text, a boundary may come
                cut = _find_cut(tokenize, pending, 1, hi, window, tries=64) or hi  # best effort
            yield tokenize(pending[:cut], add_bos and first)
            first = False
            pending = pending[cut:]
    if pending or first:
        yield tokenize(pending, add_bos and first)


def tokenize_chunks(tokenize: Tokenize, chunks: Iterable[str], *, add_bos: bool = True, **kw) -> List[int]:
    """All ids of iter_token_blocks as one list."""
    out: List[int] = []
    for block in iter_token_blocks(tokenize, chunks, add_bos=add_bos, **kw):
        out.extend(block)
    return out
