"""Independent PyTorch reference of a llama-architecture forward pass with
LM-Infinite attention.

LM-Infinite: Han et al., "LM-Infinite: Zero-Shot Extreme Length Generalization
for Large Language Models", NAACL 2024.  Written from the paper's description
(Λ-shaped attention mask + distance ceiling), *not* transliterated from ggml or
from the llama.cpp patch under test.  Everything is computed in float64.

Model: llama (pre-RMSNorm decoder, rotary position embedding, grouped-query
attention, SwiGLU FFN, untied or tied output), loaded from a GGUF file.  Arch
qwen2 is the same decoder with q/k/v projection biases (added before RoPE) and
rope type NEOX (see below).

Attention modes (query at position p_i, key at position p_j <= p_i; positions
are ``pos0 + index``):

* ``"vanilla"``: causal full attention, ordinary RoPE.
* ``"mask"``   : Λ-mask only.  Key j is visible iff ``p_j < n_global`` (one of
  the first G positions of the sequence) or ``p_i - p_j < n_local``.  Visible
  keys use ordinary RoPE (true distance).
* ``"lminf"``  : same visibility.  If ``p_i - p_j < n_local`` the score is the
  ordinary RoPE score (q rotated at p_i, k rotated at p_j).  Otherwise (a global
  key further than the window) the key is *unrotated* (rotated at position 0)
  and the query is rotated at position ``dist_max`` (= C), i.e. the effective
  relative distance is capped at C.  Note the ceiling branch uses the absolute
  positions C and 0, independent of pos0.  One softmax over all visible keys,
  then the weighted sum of V.

Top-k middle tokens (the paper's later version; ``topk=TopK(...)`` with mode
``"lminf"``): in layers ``il >= topk.layer``, each query row listed in
``topk.rows`` also attends to middle keys, those hidden by the Λ-mask
(``p_j >= n_global`` and ``p_i - p_j >= n_local``).  Per KV head it takes the
``min(k, n_middle)`` middle keys with the largest score
``sum over the query heads h of that KV head of R(dist) q_h . k_j`` (query
rotated at position ``dist``, key unrotated), and every query head of the group
scores them as ``R(dist) q_h . k_j`` (distance ``dist``) in the same softmax.

Block index (``block > 0``): the middle is cut into blocks of ``block``
positions; a block is a candidate only once indexed (all its rows were
evaluated by an earlier decode call: blocks below ``call_start // block``,
where calls are ``n_batch`` tokens).  For each store segment (segment s holds
``seg_rows * 2**min(s, 10)`` rows), the ``n_blocks`` indexed blocks with the
largest bound ``sum_d max(q_d min_d, q_d max_d)`` (per KV head, over the
block's unrotated keys) contribute all their keys; middle rows outside whole
indexed blocks are candidates as they are.  The top k of the candidates are
taken as above.

RoPE follows llama.cpp for arch llama (rope type NORM): the pairs
``(x[2d], x[2d+1])`` of each head are rotated by
``theta_d = pos * base**(-2d/n_rot)``; linear scaling multiplies theta by
``1/factor``; YaRN blends interpolated/extrapolated frequencies with a linear
ramp over the "correction dims" and multiplies cos/sin by an attention
magnitude factor (``1 + 0.1*ln(factor)`` times the file's
``rope.scaling.attn_factor``), as llama.cpp's ``ggml_rope_yarn`` does with its
default context parameters (ext_factor=1, beta_fast=32, beta_slow=1).

Arch qwen2 uses rope type NEOX: the same angles ``theta_d`` (same scaling), but
applied to the pairs ``(x[d], x[d + n_rot/2])`` of each head (rotate halves)
instead of adjacent pairs. qwen3: NEOX, no biases, and an RMS norm of each head
of q and k (its own weight) before RoPE. phi3: NEOX, fused QKV and a fused
[gate; up] FFN projection. llama 3.1's ``rope_freqs.weight`` divides each
dimension's frequency: ``theta_d = pos * base**(-2d/n_rot) / f_d``.

gemma3 (interleaved sliding-window attention): embeddings times sqrt(n_embd),
q/k RMS norms, NEOX RoPE, RMS norms after attention and after the FFN, a GEGLU
FFN (ggml's table GELU), tied output. Layer il is *local* iff
``il % pattern < pattern - 1``: it attends to the last ``sliding_window``
positions (``p_i - p_j < window``) with its own rope base, in every mode;
LM-Infinite (the modes above) applies to the *global* layers only. gemma2: the
same without the q/k norms, with its scores soft-capped, ``cap * tanh(s / cap)``
(the ceiling's scores too, before the softmax), and its logits likewise.

ALiBi archs (mpt, bloom; Press et al., "Train Short, Test Long", ICLR 2022): no
RoPE; head h adds ``-m_h * (p_i - p_j)`` to its scaled scores, with the slopes
of the ALiBi paper for ``max_bias`` (8): for n heads, n' = the largest power of
two <= n, ``m_h = 2**(-max_bias * (h + 1) / n')`` for h < n', and the remaining
heads take the odd powers of ``2**(-max_bias / (2 n'))``. LayerNorm (with the
file's biases) instead of RMSNorm, fused QKV projection (with bias for bloom),
FFN ``down(gelu(up(x)))`` (with biases for bloom), and for bloom a LayerNorm of
the embeddings. LM-Infinite on ALiBi: the same Λ visibility; in "lminf" mode a sink
beyond the window is biased as if it were at distance C, ``-m_h * C``, as the
RoPE ceiling scores it at C (with C = L, the default, this is
``-m_h * min(p_i - p_j, C)``); keys in the window keep their distance.

GELU: the model file is defined by what llama.cpp computes, and ggml's CPU GELU
is the tanh approximation read from a table of f16 values (input rounded to
f16, output an f16): the reference rounds the same way, so that the comparison
isolates attention. (Erf GELU against this table differs by ~1e-3.)

Usage::

    m = load_gguf("tiny.gguf")
    lg = m.logits([5, 17, 3], mode="lminf", n_global=2, n_local=8, dist_max=8)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch

import gguf

__all__ = ["load_gguf", "RefModel", "HParams", "TopK"]

DT = torch.float64


@dataclass
class HParams:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_ctx_train: int
    rms_eps: float
    rope_base: float = 10000.0
    rope_scaling_type: str = "none"  # "none" | "linear" | "yarn"
    rope_scaling_factor: float = 1.0  # factor (freq_scale = 1/factor)
    rope_orig_ctx: int = 0  # YaRN original context (n_ctx_orig_yarn)
    rope_attn_factor: float = 1.0  # rope.scaling.attn_factor
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_ext_factor: Optional[float] = None  # None -> 1 for yarn, 0 otherwise
    attn_scale: float = 0.0  # 0 -> 1/sqrt(head_dim)
    rope_type: str = "norm"  # "norm" (adjacent pairs, llama) | "neox" (halves, qwen2) | "none" (ALiBi)
    alibi_max_bias: float = 0.0  # > 0: ALiBi (mpt, bloom)
    swa_window: int = 0  # gemma3: the local layers' sliding window (0: none)
    swa_pattern: int = 0  # gemma3: layer il is local iff il % pattern < pattern - 1
    rope_base_swa: float = 0.0  # gemma3: the local layers' rope base
    attn_softcap: float = 0.0  # gemma2: scores capped at cap * tanh(s / cap) before the softmax (0: none)
    final_softcap: float = 0.0  # gemma2: logits capped the same way
    norm_eps: float = 0.0  # LayerNorm epsilon (ALiBi archs)


@dataclass
class TopK:
    k: int          # middle keys per KV head
    layer: int      # first layer that picks them
    dist: int       # distance at which they are attended to
    rows: Sequence[int]  # query indices (0-based in the token list) that pick them
    block: int = 0       # block index: positions per block (0: every middle key is a candidate)
    n_blocks: int = 0    # blocks per segment whose keys are candidates
    seg_rows: int = 4096  # first segment's rows
    n_batch: int = 1     # tokens per decode call (blocks are indexed between calls)
    units: int = 0       # whole blocks attended per KV head, in stream order (needs block > 0; 0: single keys)

    def candidates(self, i, mid, k0, q_sel, hk):
        """Middle positions (a subset of ``mid``) the query row i may choose from in KV head hk."""
        if self.block == 0:
            return mid
        exact, blocks = self.split(i, mid, k0, q_sel, hk)
        B = self.block
        chosen = [r for b in blocks for r in range(b * B, (b + 1) * B)]
        return torch.as_tensor(sorted(exact + chosen), dtype=torch.int64)

    def split(self, i, mid, k0, q_sel, hk):
        """(rows outside indexed blocks, the indexed blocks the bound chose) for the query row i in KV head hk."""
        B = self.block
        mid0, mid1 = int(mid[0]), int(mid[-1]) + 1
        blk0 = -(-mid0 // B)
        blk1 = max(blk0, min(mid1 // B, (i // self.n_batch) * self.n_batch // B))
        exact = [r for r in range(mid0, mid1) if r < blk0 * B or r >= blk1 * B]
        chosen = []
        seg_begin, s = 0, 0
        while seg_begin < blk1 * B:
            seg_end = seg_begin + self.seg_rows * 2 ** min(s, 10)
            blocks = [b for b in range(max(blk0, seg_begin // B), min(blk1, seg_end // B))]
            if blocks:
                keys = torch.stack([k0[b * B:(b + 1) * B, hk] for b in blocks])  # [nb, B, D]
                bound = (q_sel.clamp(min=0) * keys.max(1).values + q_sel.clamp(max=0) * keys.min(1).values).sum(-1)
                best = torch.topk(bound, min(self.n_blocks, len(blocks))).indices
                chosen += [blocks[j] for j in best.tolist()]
            seg_begin, s = seg_end, s + 1
        return exact, chosen

    def unit_order(self, blocks):
        """The chosen blocks (best first) in the order they are placed: the stream's."""
        return sorted(blocks)

    def units_choice(self, i, mid, k0, q_sel, hk, scale, q_heads):
        """Memory units (units > 0): ({row: extra distance}) of the middle keys row i attends in KV head hk: the
        k best single keys of the rows outside indexed blocks (extra 0), and of the blocks the bound chose, the
        ``units`` with the most attention summed over the query heads q_heads [rep, D] (each head's
        softmax(scale * q.k) over those blocks' keys), in stream order, row r*B + t of the n sorted ones at extra
        distance n*B - 1 - (r*B + t)."""
        B = self.block
        exact, blocks = self.split(i, mid, k0, q_sel, hk)
        out = {}
        if exact:
            rows = torch.as_tensor(exact, dtype=torch.int64)
            best = torch.topk(k0[rows, hk] @ q_sel, min(self.k, len(exact))).indices
            out.update({int(rows[b]): 0 for b in best})
        if blocks:
            keys = torch.stack([k0[b * B:(b + 1) * B, hk] for b in blocks])  # [nb, B, D]
            p = torch.softmax(keys.reshape(-1, keys.shape[-1]) @ q_heads.T * scale, 0)  # [nb*B, rep]
            best = torch.topk(p.sum(1).reshape(len(blocks), B).sum(1), min(self.units, len(blocks))).indices
            chosen = self.unit_order([blocks[b] for b in best.tolist()])
            n = len(chosen) * B
            out.update({b * B + t: n - 1 - (r * B + t) for r, b in enumerate(chosen) for t in range(B)})
        return out


def _field_value(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


# rope type per architecture (fixed by the architecture in llama.cpp, not a GGUF key)
_ROPE_TYPE = {"llama": "norm", "qwen2": "neox", "qwen3": "neox", "phi3": "neox", "gemma3": "neox",
              "gemma2": "neox", "mpt": "none", "bloom": "none"}


def load_gguf(path) -> "RefModel":
    """Read hparams and tensors (f32/f16/q8_0/... via gguf.quants) from a GGUF."""
    r = gguf.GGUFReader(str(path))
    arch = _field_value(r, "general.architecture")
    if arch not in _ROPE_TYPE:
        raise ValueError(f"reference only implements archs {sorted(_ROPE_TYPE)}, got {arch!r}")
    a = arch + "."

    tensors: Dict[str, torch.Tensor] = {}
    for t in r.tensors:
        # numpy shape of the dequantized array is ggml's ne reversed, i.e.
        # [out, in] for matrices: y = W @ x.
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        arr = np.asarray(arr, dtype=np.float64).reshape(tuple(reversed([int(x) for x in t.shape])))
        tensors[t.name] = torch.from_numpy(arr.copy())

    if _ROPE_TYPE[arch] == "none":
        return _load_alibi(r, arch, tensors)

    n_embd = int(_field_value(r, a + "embedding_length"))
    n_head = int(_field_value(r, a + "attention.head_count"))
    n_head_kv = int(_field_value(r, a + "attention.head_count_kv", n_head))
    head_dim = int(_field_value(r, a + "attention.key_length", n_embd // n_head))
    n_rot = int(_field_value(r, a + "rope.dimension_count", head_dim))
    n_ctx_train = int(_field_value(r, a + "context_length"))
    n_vocab = tensors["token_embd.weight"].shape[0]

    scaling_type = _field_value(r, a + "rope.scaling.type", "linear")
    factor = float(_field_value(r, a + "rope.scaling.factor", 0.0) or 0.0)
    if factor == 0.0:
        factor = float(_field_value(r, a + "rope.scale_linear", 0.0) or 0.0)
    if factor == 0.0:
        factor = 1.0
    if scaling_type == "none":
        factor = 1.0
    if scaling_type not in ("none", "linear", "yarn"):
        raise NotImplementedError(f"rope scaling {scaling_type!r}")

    hp = HParams(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=int(_field_value(r, a + "block_count")),
        n_ff=int(_field_value(r, a + "feed_forward_length")),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_rot=n_rot,
        n_ctx_train=n_ctx_train,
        rms_eps=float(_field_value(r, a + "attention.layer_norm_rms_epsilon")),
        rope_base=float(_field_value(r, a + "rope.freq_base", 10000.0)),
        rope_scaling_type=scaling_type,
        rope_scaling_factor=factor,
        rope_orig_ctx=int(_field_value(r, a + "rope.scaling.original_context_length", 0) or 0) or n_ctx_train,
        rope_attn_factor=float(_field_value(r, a + "rope.scaling.attn_factor", 1.0)),
        attn_scale=float(_field_value(r, a + "attention.scale", 0.0) or 0.0),
        rope_type=_ROPE_TYPE[arch],
    )
    if arch in ("gemma3", "gemma2"):
        hp.swa_window = int(_field_value(r, a + "attention.sliding_window", 0) or 0)
        hp.swa_pattern = int(_field_value(r, a + "attention.sliding_window_pattern", 6 if arch == "gemma3" else 2))
        hp.rope_base_swa = float(_field_value(r, a + "rope.freq_base_swa", hp.rope_base))
    if arch == "gemma2":
        hp.attn_softcap = float(_field_value(r, a + "attn_logit_softcapping", 0.0) or 0.0)
        hp.final_softcap = float(_field_value(r, a + "final_logit_softcapping", 0.0) or 0.0)
    if hp.n_rot != hp.head_dim:
        raise NotImplementedError("partial rotary (n_rot != head_dim) not supported")
    return RefModel(hp, tensors)


def _load_alibi(r, arch: str, tensors) -> "RefModel":
    a = arch + "."
    n_embd = int(_field_value(r, a + "embedding_length"))
    n_head = int(_field_value(r, a + "attention.head_count"))
    hp = HParams(
        arch=arch, n_vocab=tensors["token_embd.weight"].shape[0], n_embd=n_embd,
        n_layer=int(_field_value(r, a + "block_count")), n_ff=int(_field_value(r, a + "feed_forward_length")),
        n_head=n_head, n_head_kv=int(_field_value(r, a + "attention.head_count_kv", n_head)),
        head_dim=n_embd // n_head, n_rot=0, n_ctx_train=int(_field_value(r, a + "context_length")), rms_eps=0.0,
        rope_type="none", norm_eps=float(_field_value(r, a + "attention.layer_norm_epsilon")),
        # bloom's is not a GGUF key: 8, as in the BLOOM paper (and llama.cpp)
        alibi_max_bias=float(_field_value(r, a + "attention.max_alibi_bias", 8.0 if arch == "bloom" else 0.0)))
    if hp.alibi_max_bias <= 0:
        raise NotImplementedError(f"{arch} without ALiBi")
    return RefModel(hp, tensors)


def alibi_slopes(n_head: int, max_bias: float) -> torch.Tensor:
    """The per-head ALiBi slopes (see the module doc), from the ALiBi paper's construction."""
    n2 = 2 ** int(math.floor(math.log2(n_head)))
    base = 2.0 ** (-max_bias / n2)
    slopes = [base ** (h + 1) for h in range(n2)]
    extra = 2.0 ** (-max_bias / (2 * n2))
    slopes += [extra ** (2 * i + 1) for i in range(n_head - n2)]
    return torch.tensor(slopes, dtype=DT)


def gelu_f16_table(x: torch.Tensor) -> torch.Tensor:
    """ggml's CPU GELU: tanh approximation on the f16-rounded input, rounded to f16 (|x| >= 10: 0 or x)."""
    x16 = x.to(torch.float16).to(DT)
    y = 0.5 * x16 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * x16 * (1.0 + 0.044715 * x16 * x16)))
    y = y.to(torch.float16).to(DT)
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))


class RefModel:
    def __init__(self, hp: HParams, tensors: Dict[str, torch.Tensor]):
        self.hp = hp
        self.t = tensors

    # ------------------------------------------------------------------ rope
    def rope_cos_sin(self, pos, base: Optional[float] = None) -> tuple:
        """cos, sin (already multiplied by the YaRN magnitude factor) of shape
        [len(pos), n_rot/2] for integer/float positions ``pos`` (base: another rope base than the model's)."""
        hp = self.hp
        pos = torch.as_tensor(pos, dtype=DT).reshape(-1, 1)
        d = torch.arange(hp.n_rot // 2, dtype=DT)
        inv_freq = (base or hp.rope_base) ** (-2.0 * d / hp.n_rot)  # [n_rot/2]
        if "rope_freqs.weight" in self.t:  # llama 3.1's per-dimension divisors
            inv_freq = inv_freq / self.t["rope_freqs.weight"]
        theta_extrap = pos * inv_freq  # [P, n_rot/2]
        freq_scale = 1.0 / hp.rope_scaling_factor
        theta_interp = freq_scale * theta_extrap
        mscale = hp.rope_attn_factor
        ext = hp.yarn_ext_factor
        if ext is None:
            ext = 1.0 if hp.rope_scaling_type == "yarn" else 0.0
        if ext != 0.0:
            factor = hp.rope_scaling_factor
            # llama.cpp's context setup: attn_factor = mscale(factor) / (1 + 0.1 ln factor)
            # (== 1 for factor > 1, 1/(1+0.1 ln f) for f <= 1), then ggml multiplies by
            # (1 + 0.1 ln(1/freq_scale)).
            get_mscale = 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0
            mscale = mscale * get_mscale / (1.0 + 0.1 * math.log(factor))
            mscale = mscale * (1.0 + 0.1 * math.log(1.0 / freq_scale))
            lo, hi = self._yarn_corr_dims(ext)
            y = (d - lo) / max(0.001, hi - lo)
            ramp = (1.0 - y.clamp(0.0, 1.0)) * ext  # 1 -> extrapolate (high freq)
            theta = theta_interp * (1.0 - ramp) + theta_extrap * ramp
        else:
            theta = theta_interp
        return torch.cos(theta) * mscale, torch.sin(theta) * mscale

    def _yarn_corr_dims(self, ext):
        hp = self.hp
        n_ctx_orig = hp.rope_orig_ctx or hp.n_ctx_train

        def corr_dim(n_rot_beta):
            return hp.n_rot * math.log(n_ctx_orig / (n_rot_beta * 2 * math.pi)) / (2 * math.log(hp.rope_base))

        start = math.floor(corr_dim(hp.yarn_beta_fast))
        end = math.ceil(corr_dim(hp.yarn_beta_slow))
        return max(0.0, float(start)), min(float(hp.n_rot - 1), float(end))

    def rope(self, x: torch.Tensor, pos, base: Optional[float] = None) -> torch.Tensor:
        """Rotate x [P, H, D] at positions pos (len P, or a scalar for all)."""
        P = x.shape[0]
        pos = torch.as_tensor(pos, dtype=DT)
        if pos.ndim == 0:
            pos = pos.expand(P)
        cos, sin = self.rope_cos_sin(pos, base)  # [P, D/2]
        cos = cos[:, None, :]
        sin = sin[:, None, :]
        out = torch.empty_like(x)
        if self.hp.rope_type == "neox":
            # pairs (x[d], x[d + n_rot/2])
            half = self.hp.n_rot // 2
            x0 = x[..., :half]
            x1 = x[..., half:2 * half]
            out[..., :half] = x0 * cos - x1 * sin
            out[..., half:2 * half] = x0 * sin + x1 * cos
            return out
        # pairs (x[2d], x[2d+1])
        x0 = x[..., 0::2]
        x1 = x[..., 1::2]
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    # ---------------------------------------------------------------- blocks
    def scale(self) -> float:
        """The attention's scale of q.k."""
        return self.hp.attn_scale if self.hp.attn_scale != 0.0 else 1.0 / math.sqrt(self.hp.head_dim)

    def _rmsnorm(self, x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.hp.rms_eps) * w

    def _topk_extra(self, q, k, middle, topk):
        """([H, T, T] bool, [H, T, T] scores): the middle keys each query head attends to (per KV head choice, see
        the module doc) and their unscaled scores at distance topk.dist plus their extra distance (memory units)."""
        hp = self.hp
        rep = hp.n_head // hp.n_head_kv
        qd = self.rope(q, float(topk.dist))  # [T, H, D]
        k0 = self.rope(k, 0.0)  # [T, Hkv, D]
        extra, off = self._topk_choice(qd, k0, middle, topk)
        s = torch.einsum("ihd,jhd->hij", qd, k0.repeat_interleave(rep, dim=1))
        for o in off.unique().tolist():
            if o > 0:  # a key at position -o: distance topk.dist + o from the query at topk.dist
                s_o = torch.einsum("ihd,jhd->hij", qd, self.rope(k, -float(o)).repeat_interleave(rep, dim=1))
                s = torch.where(off == o, s_o, s)
        return extra, s

    def _topk_choice(self, q, k_kv, middle, topk):
        """([n_head, T, T] mask, [n_head, T, T] extra distances) of the middle keys each row of topk.rows attends:
        per KV head the topk.k of the highest q.k, q summed over the head's query heads (q [T, H, D], k_kv
        [T, Hkv, D] as scored), or with topk.units the memory units of TopK.units_choice."""
        hp = self.hp
        rep = hp.n_head // hp.n_head_kv
        T = q.shape[0]
        extra = torch.zeros(hp.n_head, T, T, dtype=torch.bool)
        off = torch.zeros(hp.n_head, T, T, dtype=torch.int64)
        for i in topk.rows:
            mid = torch.nonzero(middle[i]).flatten()
            if len(mid) == 0:
                continue
            for hk in range(hp.n_head_kv):
                q_sel = q[i, hk * rep:(hk + 1) * rep].sum(0)
                if topk.units:
                    for j, o in topk.units_choice(i, mid, k_kv, q_sel, hk, self.scale(),
                                                      q[i, hk * rep:(hk + 1) * rep]).items():
                        extra[hk * rep:(hk + 1) * rep, i, j] = True
                        off[hk * rep:(hk + 1) * rep, i, j] = o
                    continue
                cand = topk.candidates(i, mid, k_kv, q_sel, hk)
                best = torch.topk(k_kv[cand, hk] @ q_sel, min(topk.k, len(cand))).indices
                extra[hk * rep:(hk + 1) * rep, i, cand[best]] = True
        return extra, off

    def _attention(self, il, h, pos, mode, n_global, n_local, dist_max, topk=None):
        hp = self.hp
        t = self.t
        p = f"blk.{il}."
        T = h.shape[0]
        D = hp.head_dim
        if p + "attn_qkv.weight" in t:  # fused (mpt, bloom): rows q, k, v
            qkv = h @ t[p + "attn_qkv.weight"].T
            if p + "attn_qkv.bias" in t:
                qkv = qkv + t[p + "attn_qkv.bias"]
            n_q, n_kv = hp.n_head * D, hp.n_head_kv * D
            q, k, v = qkv[:, :n_q], qkv[:, n_q:n_q + n_kv], qkv[:, n_q + n_kv:]
        else:
            q = h @ t[p + "attn_q.weight"].T
            k = h @ t[p + "attn_k.weight"].T
            v = h @ t[p + "attn_v.weight"].T
        # projection biases (qwen2), added before RoPE
        if p + "attn_q.bias" in t:
            q = q + t[p + "attn_q.bias"]
        if p + "attn_k.bias" in t:
            k = k + t[p + "attn_k.bias"]
        if p + "attn_v.bias" in t:
            v = v + t[p + "attn_v.bias"]
        q = q.reshape(T, hp.n_head, D)
        k = k.reshape(T, hp.n_head_kv, D)
        v = v.reshape(T, hp.n_head_kv, D)
        if p + "attn_q_norm.weight" in t:  # qwen3: per-head RMS norm of q and k, before RoPE
            q = self._rmsnorm(q, t[p + "attn_q_norm.weight"])
            k = self._rmsnorm(k, t[p + "attn_k_norm.weight"])
        k_kv = k

        # GQA: query head hq uses kv head hq // (n_head / n_head_kv)
        rep = hp.n_head // hp.n_head_kv
        k = k.repeat_interleave(rep, dim=1)  # [T, n_head, D]
        v = v.repeat_interleave(rep, dim=1)

        scale = self.scale()

        pi = pos[:, None]
        pj = pos[None, :]
        dist = pi - pj
        causal = dist >= 0
        if hp.rope_type == "none":
            return self._attention_alibi(il, q, k, v, dist, causal, mode, n_global, n_local, dist_max, scale, topk,
                                         pj)

        if self.is_local(il):  # gemma3's local layers: their own window, their own rope base; LM-Infinite leaves them
            qr, kr = self.rope(q, pos, hp.rope_base_swa), self.rope(k, pos, hp.rope_base_swa)
            s = self._softcap(torch.einsum("ihd,jhd->hij", qr, kr) * scale)
            s = s.masked_fill(~(causal & (dist < hp.swa_window))[None], float("-inf"))
            o = torch.einsum("hij,jhd->ihd", torch.softmax(s, dim=-1), v).reshape(T, hp.n_head * D)
            return o @ t[p + "attn_output.weight"].T

        qr = self.rope(q, pos)
        kr = self.rope(k, pos)
        s_near = torch.einsum("ihd,jhd->hij", qr, kr) * scale  # [H, T, T]
        if mode == "vanilla":
            visible = causal
            s = s_near
        elif mode in ("mask", "lminf"):
            near = causal & (dist < n_local)
            glob = causal & (pj < n_global)
            visible = near | glob
            if mode == "mask":
                s = s_near
            else:
                qc = self.rope(q, float(dist_max))  # every query rotated at C
                k0 = self.rope(k, 0.0)  # keys at position 0 (identity * mscale)
                s_far = torch.einsum("ihd,jhd->hij", qc, k0) * scale
                s = torch.where(near[None], s_near, s_far)
        else:
            raise ValueError(f"unknown mode {mode!r}")

        s = self._softcap(s)  # gemma2: the scores, the ceiling's included, are capped before the softmax
        visible = visible[None]
        if topk is not None and il >= topk.layer:
            if mode != "lminf":
                raise ValueError("top-k middle tokens are defined on top of mode 'lminf'")
            extra, s_top = self._topk_extra(q, k_kv, causal & ~near & ~glob, topk)
            s = torch.where(extra, self._softcap(s_top * scale), s)  # gemma2: capped too
            visible = visible | extra

        s = s.masked_fill(~visible, float("-inf"))
        a = torch.softmax(s, dim=-1)
        o = torch.einsum("hij,jhd->ihd", a, v).reshape(T, hp.n_head * D)
        return o @ t[p + "attn_output.weight"].T

    def _softcap(self, s):
        cap = self.hp.attn_softcap
        return cap * torch.tanh(s / cap) if cap > 0 else s

    def is_local(self, il: int) -> bool:
        hp = self.hp
        return hp.swa_window > 0 and il % hp.swa_pattern < hp.swa_pattern - 1

    def _attention_alibi(self, il, q, k, v, dist, causal, mode, n_global, n_local, dist_max, scale, topk, pj):
        hp = self.hp
        t = self.t
        p = f"blk.{il}."
        T = q.shape[0]
        s0 = torch.einsum("ihd,jhd->hij", q, k) * scale
        d = dist.to(DT)
        if mode == "lminf":  # the ceiling: a sink beyond the window is biased as if it were at distance C
            d = torch.where(dist < n_local, d, torch.full_like(d, float(dist_max)))
        slopes = alibi_slopes(hp.n_head, hp.alibi_max_bias)[:, None, None]
        s = s0 - slopes * d[None]
        if mode == "vanilla":
            visible = causal
        elif mode in ("mask", "lminf"):
            visible = causal & ((dist < n_local) | (pj < n_global))
        else:
            raise ValueError(f"unknown mode {mode!r}")
        if topk is not None and il >= topk.layer:
            if mode != "lminf":
                raise ValueError("top-k middle tokens are defined on top of mode 'lminf'")
            extra, off = self._topk_extra_alibi(q, k, causal & (dist >= n_local) & (pj >= n_global), topk)
            s = torch.where(extra, s0 - slopes * (float(topk.dist) + off), s)  # at topk.dist (+ a unit's offset)
            visible = visible[None] | extra  # [H, T, T]
        s = s.masked_fill(~visible, float("-inf"))
        a = torch.softmax(s, dim=-1)
        o = torch.einsum("hij,jhd->ihd", a, v).reshape(T, hp.n_head * hp.head_dim)
        o = o @ t[p + "attn_output.weight"].T
        if p + "attn_output.bias" in t:
            o = o + t[p + "attn_output.bias"]
        return o

    def _topk_extra_alibi(self, q, k, middle, topk):
        """_topk_extra for ALiBi (q, k [T, H, D], k repeated over the query heads): nothing is rotated; each KV head
        keeps the middle keys of the highest q.k (summed over its query heads), as the bias -slope_h * topk.dist is
        the same for every middle key of a head (memory units: chosen by q.k too, their offsets in the bias)."""
        hp = self.hp
        rep = hp.n_head // hp.n_head_kv
        return self._topk_choice(q, k[:, ::rep], middle, topk)  # k [T, H, D] repeated per query head: one per KV head

    def _layernorm(self, x, name):
        t = self.t
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + self.hp.norm_eps) * t[name + ".weight"]
        return y + t[name + ".bias"] if name + ".bias" in t else y

    def _norm(self, x, name):
        if self.hp.rope_type == "none":
            return self._layernorm(x, name)
        return self._rmsnorm(x, self.t[name + ".weight"])

    def _ffn(self, il, h):
        t = self.t
        p = f"blk.{il}."
        if self.hp.rope_type == "none":  # mpt, bloom: down(gelu(up(x))), biases where present
            u = h @ t[p + "ffn_up.weight"].T
            if p + "ffn_up.bias" in t:
                u = u + t[p + "ffn_up.bias"]
            o = gelu_f16_table(u) @ t[p + "ffn_down.weight"].T
            return o + t[p + "ffn_down.bias"] if p + "ffn_down.bias" in t else o
        if self.hp.arch in ("gemma3", "gemma2"):  # GEGLU, ggml's table GELU
            g = h @ t[p + "ffn_gate.weight"].T
            u = h @ t[p + "ffn_up.weight"].T
            return (gelu_f16_table(g) * u) @ t[p + "ffn_down.weight"].T
        if p + "ffn_gate.weight" not in t:  # phi3: fused [gate; up]
            gu = h @ t[p + "ffn_up.weight"].T
            g, u = gu[:, :gu.shape[1] // 2], gu[:, gu.shape[1] // 2:]
            return (torch.nn.functional.silu(g) * u) @ t[p + "ffn_down.weight"].T
        g = h @ t[p + "ffn_gate.weight"].T
        u = h @ t[p + "ffn_up.weight"].T
        return (torch.nn.functional.silu(g) * u) @ t[p + "ffn_down.weight"].T

    # --------------------------------------------------------------- forward
    @torch.no_grad()
    def logits(
        self,
        tokens: Sequence[int],
        *,
        mode: str = "vanilla",
        n_global: int = 0,
        n_local: Optional[int] = None,
        dist_max: Optional[int] = None,
        pos0: int = 0,
        topk: Optional[TopK] = None,
    ) -> np.ndarray:
        """Logits [T, n_vocab] (float64) for all tokens, placed at positions
        pos0 .. pos0+T-1.  n_local defaults to infinity (no window), dist_max
        defaults to n_local."""
        hp = self.hp
        t = self.t
        tok = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
        T = tok.shape[0]
        if n_local is None:
            n_local = 1 << 62
        if dist_max is None:
            dist_max = n_local
        pos = torch.arange(T, dtype=torch.int64) + int(pos0)

        x = t["token_embd.weight"][tok]
        if "token_embd_norm.weight" in t:  # bloom
            x = self._layernorm(x, "token_embd_norm")
        if hp.arch in ("gemma3", "gemma2"):  # embeddings scaled by sqrt(n_embd); norms after attention and FFN
            x = x * math.sqrt(hp.n_embd)
            for il in range(hp.n_layer):
                p = f"blk.{il}."
                h = self._rmsnorm(x, t[p + "attn_norm.weight"])
                h = self._attention(il, h, pos, mode, n_global, n_local, dist_max, topk)
                x = x + self._rmsnorm(h, t[p + "post_attention_norm.weight"])
                h = self._ffn(il, self._rmsnorm(x, t[p + "ffn_norm.weight"]))
                x = x + self._rmsnorm(h, t[p + "post_ffw_norm.weight"])
            x = self._rmsnorm(x, t["output_norm.weight"])
            out = x @ t["token_embd.weight"].T
            if hp.final_softcap > 0:
                out = hp.final_softcap * torch.tanh(out / hp.final_softcap)
            return out.numpy()
        for il in range(hp.n_layer):
            h = self._norm(x, f"blk.{il}.attn_norm")
            x = x + self._attention(il, h, pos, mode, n_global, n_local, dist_max, topk)
            h = self._norm(x, f"blk.{il}.ffn_norm")
            x = x + self._ffn(il, h)
        x = self._norm(x, "output_norm")
        w_out = t.get("output.weight", t["token_embd.weight"])
        out = x @ w_out.T
        if "output.bias" in t:
            out = out + t["output.bias"]
        return out.numpy()
