"""Writers of tiny random llama-architecture GGUF models for tests.

The models are meant for numerical comparisons between llama.cpp and the
independent PyTorch reference in ``tests/reference.py``; tests feed token ids
directly, so the tokenizer is a minimal SentencePiece-style ("llama") vocab that
llama.cpp accepts.

Tensor layout: ``gguf.GGUFWriter.add_tensor`` takes a numpy array whose shape is
the *reverse* of ggml's ``ne``.  llama.cpp expects e.g. ``attn_q`` with
``ne = {n_embd, n_head*head_dim}``, i.e. numpy shape ``(n_head*head_dim, n_embd)``
which is the usual ``y = W @ x`` (PyTorch ``nn.Linear.weight``) layout.

Rope: arch llama uses rope type NORM (rotates adjacent pairs), arch qwen2 rope
type NEOX (rotates halves).  Since weights are random no HF->GGUF q/k permutation
is involved.

``write_tiny_gemma3`` writes a gemma3 model with interleaved sliding-window
layers (the reference implements it).

``write_tiny_alibi`` writes the ALiBi architectures (mpt, bloom): LayerNorm,
fused QKV, GELU FFN, no RoPE; the reference implements both.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np

import gguf

__all__ = ["write_tiny_llama", "write_tiny_qwen2", "write_tiny_qwen3", "write_tiny_phi3", "write_tiny_gemma3",
           "write_tiny_alibi"]


def _as_dtype(arr: np.ndarray, dtype: str):
    """Return (array, raw_dtype) suitable for GGUFWriter.add_tensor."""
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "f32":
        return arr, None
    if dtype == "f16":
        return arr.astype(np.float16), None
    if dtype == "q8_0":
        q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
        return q, gguf.GGMLQuantizationType.Q8_0
    raise ValueError(f"unsupported dtype {dtype!r} (use 'f32', 'f16' or 'q8_0')")


# GGUF file type for the dtype of the 2-D weight matrices
_FTYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
           "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def _tensor_adder(w, dtype: str):
    """add(name, array, mat=True): a weight matrix in `dtype` (mat), or an f32 vector (norms, biases)."""
    def add(name, arr, mat=True):
        if mat:
            data, raw = _as_dtype(arr, dtype)
            if raw is not None:
                w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=raw)
            else:
                w.add_tensor(name, data)
        else:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    return add


def write_tiny_llama(path: Union[str, os.PathLike], **kwargs) -> str:
    """Write a tiny random llama GGUF to ``path`` and return ``str(path)`` (keyword arguments: _write_tiny)."""
    return _write_tiny(path, arch="llama", **kwargs)


def write_tiny_qwen2(path: Union[str, os.PathLike], **kwargs) -> str:
    """Write a tiny random qwen2 GGUF to ``path`` and return ``str(path)``.

    Keyword arguments as for ``_write_tiny``.  Differences from llama, as
    llama.cpp's qwen2 expects them: keys ``qwen2.*``, q/k/v biases
    ``blk.N.attn_{q,k,v}.bias`` (shape [n_head*head_dim] / [n_head_kv*head_dim],
    always f32), rope type NEOX (fixed by the architecture in llama.cpp; rotates
    the pairs (x[d], x[d + n_rot/2])), and ``n_head*head_dim == n_embd``
    (llama.cpp creates ``attn_output`` as {n_embd, n_embd}).  The tokenizer is
    the same minimal SPM ("llama") vocab, which llama.cpp accepts for any arch.
    """
    return _write_tiny(path, arch="qwen2", **kwargs)


def write_tiny_qwen3(path: Union[str, os.PathLike], **kwargs) -> str:
    """A tiny random qwen3 GGUF: llama's layout without biases plus per-head RMS norms of q and k
    (``blk.N.attn_{q,k}_norm.weight`` [head_dim], applied before RoPE), rope type NEOX."""
    return _write_tiny(path, arch="qwen3", **kwargs)


def write_tiny_phi3(path: Union[str, os.PathLike], **kwargs) -> str:
    """A tiny random phi3 GGUF: fused ``attn_qkv`` [n_embd + 2 n_embd_kv, n_embd], fused ``ffn_up``
    [2 n_ff, n_embd] (gate rows first: SwiGLU of the two halves), no ffn_gate, rope type NEOX,
    ``n_head*head_dim == n_embd``."""
    return _write_tiny(path, arch="phi3", **kwargs)


def _write_tiny(
    path: Union[str, os.PathLike],
    *,
    arch: str = "llama",
    n_vocab: int = 96,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_layer: int = 2,
    n_ff: int = 96,
    n_ctx_train: int = 64,
    rope_base: float = 10000.0,
    rope_scaling: Optional[Sequence] = None,
    dtype: str = "f32",
    seed: int = 0,
    rms_eps: float = 1e-5,
    qk_gain: float = 1.5,
    rope_freqs: bool = False,
) -> str:
    """Write a tiny random ``arch`` ("llama", "qwen2", "qwen3", "phi3") GGUF; return ``str(path)``.

    rope_scaling: None, ("linear", factor) or ("yarn", factor, orig_ctx).
    dtype: "f32", "f16" or "q8_0" for the 2-D weight matrices (norm weights
    always f32; q8_0 needs n_embd and n_ff multiples of 32).
    qk_gain: q/k projection std is qk_gain/sqrt(n_embd), so that per-head
    attention scores have std ~qk_gain**2 (peaky, non-degenerate softmax).
    rope_freqs: llama 3.1's per-dimension frequency divisors (``rope_freqs.weight``
    [head_dim/2]: 1 for the high frequencies up to 8 for the low ones).
    """
    path = str(path)
    assert arch in ("llama", "qwen2", "qwen3", "phi3"), arch
    assert n_embd % n_head == 0, "n_embd must be divisible by n_head"
    assert n_head % n_head_kv == 0, "n_head must be divisible by n_head_kv"
    head_dim = n_embd // n_head
    assert head_dim % 2 == 0, "head_dim must be even"
    n_special = 4  # <unk>, <s>, </s>, <0x0A>
    assert n_vocab > n_special

    rng = np.random.default_rng(seed)

    def randn(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    ftype = _FTYPES[dtype]

    w = gguf.GGUFWriter(path, arch)
    # (llama.cpp's vocabulary loader expects phi-3's special tokens in a model *named* phi3: not this one)
    w.add_name(f"tiny-random-{arch}" if arch != "phi3" else "tiny-random-phi-three")
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_rope_freq_base(float(rope_base))
    w.add_vocab_size(n_vocab)
    w.add_file_type(ftype)

    if rope_scaling is None:
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    else:
        kind = rope_scaling[0]
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope_scaling[1]))
        elif kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rope_scaling[1]))
            orig = int(rope_scaling[2]) if len(rope_scaling) > 2 else n_ctx_train
            w.add_rope_scaling_orig_ctx_len(orig)
        else:
            raise ValueError(f"unknown rope_scaling {rope_scaling!r}")

    # minimal SPM ("llama") tokenizer: <unk>=0, <s>=1, </s>=2, <0x0A>=3, rest normal
    tokens = ["<unk>", "<s>", "</s>", "<0x0A>"] + [f"t{i}" for i in range(n_vocab - n_special)]
    T = gguf.TokenType
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL, T.BYTE] + [T.NORMAL] * (n_vocab - n_special)
    scores = [0.0] * n_special + [-float(i) for i in range(n_vocab - n_special)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([int(t) for t in types])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)

    add = _tensor_adder(w, dtype)

    qk_std = qk_gain / np.sqrt(n_embd)
    add("token_embd.weight", randn(n_vocab, n_embd, std=1.0))
    if rope_freqs:
        half = head_dim // 2
        add("rope_freqs.weight", np.concatenate([np.ones(half - half // 2), np.linspace(2.0, 8.0, half // 2)]),
            mat=False)
    for il in range(n_layer):
        p = f"blk.{il}."
        add(p + "attn_norm.weight", 1.0 + randn(n_embd, std=0.1), mat=False)
        wq = randn(n_head * head_dim, n_embd, std=qk_std)
        wk = randn(n_head_kv * head_dim, n_embd, std=qk_std)
        wv = randn(n_head_kv * head_dim, n_embd, std=1.0 / np.sqrt(n_embd))
        if arch == "phi3":
            add(p + "attn_qkv.weight", np.concatenate([wq, wk, wv]))
        else:
            add(p + "attn_q.weight", wq)
            add(p + "attn_k.weight", wk)
            add(p + "attn_v.weight", wv)
        if arch == "qwen3":
            add(p + "attn_q_norm.weight", 1.0 + randn(head_dim, std=0.2), mat=False)
            add(p + "attn_k_norm.weight", 1.0 + randn(head_dim, std=0.2), mat=False)
        if arch == "qwen2":
            # biases of the size of a typical row product, so that they matter (also through RoPE)
            add(p + "attn_q.bias", randn(n_head * head_dim, std=0.5 * qk_gain), mat=False)
            add(p + "attn_k.bias", randn(n_head_kv * head_dim, std=0.5 * qk_gain), mat=False)
            add(p + "attn_v.bias", randn(n_head_kv * head_dim, std=0.5), mat=False)
        add(p + "attn_output.weight", randn(n_embd, n_head * head_dim, std=1.0 / np.sqrt(n_head * head_dim)))
        add(p + "ffn_norm.weight", 1.0 + randn(n_embd, std=0.1), mat=False)
        gate, up = randn(n_ff, n_embd, std=1.0 / np.sqrt(n_embd)), randn(n_ff, n_embd, std=1.0 / np.sqrt(n_embd))
        if arch == "phi3":
            add(p + "ffn_up.weight", np.concatenate([gate, up]))
        else:
            add(p + "ffn_gate.weight", gate)
            add(p + "ffn_up.weight", up)
        add(p + "ffn_down.weight", randn(n_embd, n_ff, std=1.0 / np.sqrt(n_ff)))
    add("output_norm.weight", 1.0 + randn(n_embd, std=0.1), mat=False)
    add("output.weight", randn(n_vocab, n_embd, std=2.0 / np.sqrt(n_embd)))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_spm_vocab(w, n_vocab: int) -> None:
    n_special = 4
    tokens = ["<unk>", "<s>", "</s>", "<0x0A>"] + [f"t{i}" for i in range(n_vocab - n_special)]
    T = gguf.TokenType
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL, T.BYTE] + [T.NORMAL] * (n_vocab - n_special)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_special + [-float(i) for i in range(n_vocab - n_special)])
    w.add_token_types([int(t) for t in types])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def write_tiny_gemma3(
    path: Union[str, os.PathLike],
    *,
    n_vocab: int = 96,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_layer: int = 2,
    n_ff: int = 96,
    n_ctx_train: int = 64,
    sliding_window: int = 8,
    sliding_window_pattern: int = 2,
    seed: int = 0,
    rope_base: float = 10000.0,
    rope_base_swa: Optional[float] = None,
    qk_gain: float = 1.0,
    arch: str = "gemma3",
    attn_softcap: float = 50.0,
    final_softcap: float = 30.0,
) -> str:
    """Write a tiny random gemma3 GGUF (f32) with sliding-window layers; return ``str(path)``.

    What llama.cpp's LLM_ARCH_GEMMA3 loads: keys ``gemma3.*`` incl.
    ``attention.sliding_window`` (> 0 selects the iSWA cache) and
    ``attention.sliding_window_pattern`` (layer il is a window layer iff
    il % pattern < pattern - 1); per layer attn_norm, attn_{q,k,v,output},
    attn_{q,k}_norm [head_dim], post_attention_norm, ffn_norm,
    ffn_{gate,up,down}, post_ffw_norm (norm weights around 1, as converted files
    store them); rope_base for the global layers, rope_base_swa
    (``rope.freq_base_swa``) for the local ones. The reference implements it.
    """
    path = str(path)
    head_dim = n_embd // n_head
    rng = np.random.default_rng(seed)

    def randn(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    assert arch in ("gemma3", "gemma2"), arch
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-random-{arch}")
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(float(rope_base))
    if rope_base_swa is not None:
        w.add_float32(f"{arch}.rope.freq_base_swa", float(rope_base_swa))
    w.add_sliding_window(sliding_window)
    w.add_uint32(f"{arch}.attention.sliding_window_pattern", sliding_window_pattern)
    if arch == "gemma2":  # scores and logits soft-capped: cap * tanh(x / cap)
        w.add_float32("gemma2.attn_logit_softcapping", float(attn_softcap))
        w.add_float32("gemma2.final_logit_softcapping", float(final_softcap))
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_spm_vocab(w, n_vocab)

    s = 1.0 / np.sqrt(n_embd)

    def norm(n):
        return 1.0 + randn(n, std=0.1)

    w.add_tensor("token_embd.weight", randn(n_vocab, n_embd, std=s))
    for il in range(n_layer):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", norm(n_embd))
        # gemma2 has no q/k norms: the projections set the score scale (qk_gain)
        g = qk_gain if arch == "gemma2" else 1.0
        w.add_tensor(p + "attn_q.weight", randn(n_head * head_dim, n_embd, std=g * s))
        w.add_tensor(p + "attn_k.weight", randn(n_head_kv * head_dim, n_embd, std=g * s))
        w.add_tensor(p + "attn_v.weight", randn(n_head_kv * head_dim, n_embd, std=s))
        w.add_tensor(p + "attn_output.weight", randn(n_embd, n_head * head_dim, std=s))
        # q/k norms set the score scale: qk_gain around sqrt(head_dim) gives a peaky, non-degenerate softmax
        if arch == "gemma3":
            w.add_tensor(p + "attn_q_norm.weight", qk_gain * norm(head_dim))
            w.add_tensor(p + "attn_k_norm.weight", qk_gain * norm(head_dim))
        w.add_tensor(p + "post_attention_norm.weight", norm(n_embd))
        w.add_tensor(p + "ffn_norm.weight", norm(n_embd))
        w.add_tensor(p + "ffn_gate.weight", randn(n_ff, n_embd, std=s))
        w.add_tensor(p + "ffn_up.weight", randn(n_ff, n_embd, std=s))
        w.add_tensor(p + "ffn_down.weight", randn(n_embd, n_ff, std=1.0 / np.sqrt(n_ff)))
        w.add_tensor(p + "post_ffw_norm.weight", norm(n_embd))
    w.add_tensor("output_norm.weight", norm(n_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_alibi(
    path: Union[str, os.PathLike],
    *,
    arch: str = "mpt",
    n_vocab: int = 96,
    n_embd: int = 64,
    n_head: int = 4,
    n_layer: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 64,
    max_alibi_bias: float = 8.0,
    dtype: str = "f32",
    seed: int = 0,
    qk_gain: float = 1.5,
    pos_embd: bool = False,
) -> str:
    """Write a tiny random ALiBi GGUF ("mpt" or "bloom"); return ``str(path)``.

    What llama.cpp loads for them: keys ``{arch}.*`` with
    ``attention.layer_norm_epsilon``; mpt also ``attention.max_alibi_bias``
    (bloom's is fixed at 8 by llama.cpp). Per layer: attn_norm (LayerNorm; bloom
    with bias), attn_qkv [n_embd + 2 n_embd] (bloom with bias), attn_output,
    ffn_norm, ffn_up, ffn_down (bloom with biases); bloom also has
    token_embd_norm (weight and bias) after the embedding; output_norm, output.
    MPT as MPT-7B ships it: no biases, no clamp, no learned position embedding
    (pos_embd=True adds one, position_embd.weight [n_ctx_train, n_embd], as some
    MPT files have: only for refusal tests).
    """
    path = str(path)
    assert arch in ("mpt", "bloom"), arch
    assert n_embd % n_head == 0
    bloom = arch == "bloom"
    rng = np.random.default_rng(seed)

    def randn(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    ftype = _FTYPES[dtype]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-random-{arch}")
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_layer_norm_eps(1e-5)
    if not bloom:
        w.add_max_alibi_bias(float(max_alibi_bias))
    w.add_vocab_size(n_vocab)
    w.add_file_type(ftype)
    _add_spm_vocab(w, n_vocab)

    add = _tensor_adder(w, dtype)

    def norm(name):
        add(name + ".weight", 1.0 + randn(n_embd, std=0.1), mat=False)
        if bloom:
            add(name + ".bias", randn(n_embd, std=0.1), mat=False)

    qk_std = qk_gain / np.sqrt(n_embd)
    add("token_embd.weight", randn(n_vocab, n_embd, std=1.0))
    if pos_embd:
        add("position_embd.weight", randn(n_ctx_train, n_embd, std=0.1))
    if bloom:
        norm("token_embd_norm")
    for il in range(n_layer):
        p = f"blk.{il}."
        norm(p + "attn_norm")
        qkv = np.concatenate([randn(n_embd, n_embd, std=qk_std), randn(n_embd, n_embd, std=qk_std),
                              randn(n_embd, n_embd, std=1.0 / np.sqrt(n_embd))])
        add(p + "attn_qkv.weight", qkv)
        add(p + "attn_output.weight", randn(n_embd, n_embd, std=1.0 / np.sqrt(n_embd)))
        norm(p + "ffn_norm")
        add(p + "ffn_up.weight", randn(n_ff, n_embd, std=1.0 / np.sqrt(n_embd)))
        add(p + "ffn_down.weight", randn(n_embd, n_ff, std=1.0 / np.sqrt(n_ff)))
        if bloom:
            add(p + "attn_qkv.bias", randn(3 * n_embd, std=0.5), mat=False)
            add(p + "attn_output.bias", randn(n_embd, std=0.1), mat=False)
            add(p + "ffn_up.bias", randn(n_ff, std=0.1), mat=False)
            add(p + "ffn_down.bias", randn(n_embd, std=0.1), mat=False)
    norm("output_norm")
    add("output.weight", randn(n_vocab, n_embd, std=2.0 / np.sqrt(n_embd)))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
