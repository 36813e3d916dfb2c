"""Position bookkeeping of the one sequence in a context: where the next token goes, rebasing, cache figures.

llama.cpp keeps positions as int32 and computes RoPE angles in float32, so absolute positions lose precision long
before they overflow. LM-Infinite only needs relative positions inside the window (sinks beyond the window are
scored at the fixed ceiling distance), so once the next position passes `rebase_at` the window is moved down to
start right after the sinks: the middle is dropped and the window's keys are re-rotated by llama.cpp's K-shift.
Positions inside llama.cpp then stay below `rebase_at` however long the stream is.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import _lib
from ._lib import llama_raw
from .errors import ContextFullError

__all__ = ["SequenceCache", "ContextFullError", "MASK_REBASE_AT"]

# positions up to 2^24 are exact in float32
MASK_REBASE_AT = 1 << 24


@dataclass
class SequenceCache:
    ctx: object            # llama_context pointer
    bounded: bool          # LM-Infinite cache (mask/lminf) or a plain n_ctx cache (vanilla, shift)
    shift: bool            # plain cache: llama.cpp's context shift when full (else ContextFullError)
    n_global: int
    n_local: int
    n_ctx: int             # vanilla: capacity in tokens
    rebase_at: int         # lminf: largest position llama.cpp sees before a rebase
    pos: int = 0           # next position inside llama.cpp
    n_seen: int = 0        # tokens evaluated since the last reset (the stream's true length)
    n_rebase: int = 0
    n_shift: int = 0

    @classmethod
    def for_session(cls, ctx, mode, n_global: int, n_local: int, n_batch: int, rebase_at) -> "SequenceCache":
        """The bookkeeping of a new context of `mode` (an options.Mode); rebase_at None: the mode's default."""
        # rebasing is exact only with the ceiling: in "mask" mode sinks keep their true, growing distance, so the
        # window is moved only where float32 RoPE angles would otherwise lose all precision
        min_rebase = n_global + n_local + n_batch
        default_rebase = min_rebase + n_local if mode.ceiling else MASK_REBASE_AT
        return cls(ctx=ctx, bounded=mode.bounded, shift=mode.shift, n_global=n_global, n_local=n_local,
                   n_ctx=llama_raw.llama_n_ctx(ctx), rebase_at=max(rebase_at or default_rebase, min_rebase))

    def reset(self) -> None:
        llama_raw.llama_memory_clear(llama_raw.llama_get_memory(self.ctx), True)
        self.pos = 0
        self.n_seen = 0

    def reserve(self, n: int) -> int:
        """Make room for n tokens; return the position of the first."""
        if not self.bounded:
            while self.shift and self.pos + n > self.n_ctx:
                self._context_shift()
            if self.pos + n > self.n_ctx:
                raise ContextFullError(
                    f"vanilla mode: {self.pos + n} tokens exceed n_ctx = {self.n_ctx}; "
                    "use mode='lminf' for unbounded streams")
            return self.pos
        if self.pos + n > self.rebase_at:
            self._rebase()
        return self.pos

    def advance(self, n: int) -> None:
        self.pos += n
        self.n_seen += n

    def _context_shift(self) -> None:
        # as llama.cpp's examples do it: keep the first n_global tokens, drop half of the rest, move the
        # remainder down; llama.cpp re-rotates the moved keys (K-shift) before the next decode
        keep = self.n_global
        discard = (self.pos - keep) // 2
        if discard <= 0:
            raise ContextFullError(f"shift mode: nothing left to discard (n_ctx = {self.n_ctx})")
        mem = llama_raw.llama_get_memory(self.ctx)
        llama_raw.llama_memory_seq_rm(mem, 0, keep, keep + discard)
        llama_raw.llama_memory_seq_add(mem, 0, keep + discard, -1, -discard)
        self.pos -= discard
        self.n_shift += 1

    def _rebase(self) -> None:
        # the window of a query at pos is [pos - L + 1, pos - 1]; move it to [G + 1, G + L - 1], so that the next
        # query sits at G + L and every sink stays beyond the window, as it is in the true stream
        g, l = self.n_global, self.n_local
        shift = self.pos - (g + l)
        if shift <= 0:
            return
        mem = llama_raw.llama_get_memory(self.ctx)
        first_kept = self.pos - l + 1
        llama_raw.llama_memory_seq_rm(mem, 0, g, first_kept)
        llama_raw.llama_memory_seq_add(mem, 0, first_kept, -1, -shift)
        self.pos -= shift
        self.n_rebase += 1

    def cells(self) -> tuple[int, int]:
        return int(_lib.llama_lminf_cache_size(self.ctx)), int(_lib.llama_lminf_cache_used(self.ctx))
