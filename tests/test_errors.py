"""Bad parameters and unsupported set-ups fail with clear errors, at the Python and at the C level."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import lminf_gguf
from lminf_gguf import _lib
from lminf_gguf._lib import llama_raw


@pytest.mark.parametrize("kw, match", [
    (dict(mode="streaming"), "mode must be one of"),
    (dict(n_global=-1), "n_global must be an integer >= 0"),
    (dict(n_local=0), "n_local must be an integer >= 1"),
    (dict(dist_max=0), "dist_max must be an integer >= 1"),
    (dict(type_k="q3"), "type_k must be one of"),
])
def test_invalid_parameters(tiny_model, kw, match):
    path, _ = tiny_model()
    with pytest.raises(ValueError, match=match):
        lminf_gguf.LMInfinite(path, **kw)


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        lminf_gguf.LMInfinite(str(tmp_path / "absent.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(ValueError, match="cannot load model"):
        lminf_gguf.LMInfinite(str(bad))


def test_c_api_refuses_several_sequences_and_bad_parameters(tiny_model):
    path, _ = tiny_model()
    llm = lminf_gguf.LMInfinite(path, n_local=16)
    params = llama_raw.llama_context_default_params()
    params.n_seq_max = 2
    assert not _lib.llama_init_from_model_lminf(llm.model.llama_model, params, 4, 16, 16)
    params.n_seq_max = 1
    assert not _lib.llama_init_from_model_lminf(llm.model.llama_model, params, -1, 16, 16)
    assert not _lib.llama_init_from_model_lminf(llm.model.llama_model, params, 4, 0, 16)
    ctx = _lib.llama_init_from_model_lminf(llm.model.llama_model, params, 4, 16, 16)
    assert ctx
    assert (_lib.llama_lminf_n_global(ctx), _lib.llama_lminf_n_local(ctx),
            _lib.llama_lminf_dist_max(ctx)) == (4, 16, 16)
    assert _lib.llama_lminf_enabled(ctx)
    assert _lib.llama_lminf_cache_size(ctx) == 4 + 16 + params.n_ubatch
    llama_raw.llama_free(ctx)


def test_vanilla_context_is_not_lminf(tiny_model):
    path, _ = tiny_model()
    llm = lminf_gguf.LMInfinite(path, mode="vanilla", n_ctx=64)
    assert not _lib.llama_lminf_enabled(llm.ctx)
    assert llm.cache_info()["cells_total"] >= 64


def test_tail_cut_refused_once_the_window_is_gone(tiny_model):
    """seq_rm(p0, -1) must not leave a query at p0 attending to a hole."""
    path, _ = tiny_model()
    llm = lminf_gguf.LMInfinite(path, n_global=4, n_local=16, n_batch=8, rebase_at=1 << 30)
    llm.logits(list(range(4, 84)))
    mem = llama_raw.llama_get_memory(llm.ctx)
    assert llama_raw.llama_memory_seq_rm(mem, 0, 78, -1)       # window of 78 still cached
    assert not llama_raw.llama_memory_seq_rm(mem, 0, 40, -1)   # positions 25..39 were evicted


def test_empty_prompt(tiny_model):
    path, _ = tiny_model()
    with pytest.raises(ValueError, match="empty prompt"):
        lminf_gguf.LMInfinite(path, n_local=16).generate([])


def test_import_fails_clearly_without_the_patched_library(tmp_path):
    env = dict(os.environ, LMINF_LIB_PATH=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", "import lminf_gguf"], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path))
    assert res.returncode != 0
    assert "patched libllama not found" in res.stderr and "make install" in res.stderr


def _fake_hf_cache(root, repo, filename, source):
    """The layout huggingface_hub reads offline: models--OWNER--NAME/{refs/main, snapshots/REV/FILE}."""
    rev = "0" * 40
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(rev)
    snap = base / "snapshots" / rev
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(open(source, "rb").read())


def test_hf_model_from_the_offline_cache(tiny_model, tmp_path):
    pytest.importorskip("huggingface_hub")
    path, _ = tiny_model()
    _fake_hf_cache(tmp_path, "someone/tiny", "tiny.gguf", path)
    code = ("import lminf_gguf; llm = lminf_gguf.LMInfinite('hf:someone/tiny/tiny.gguf', n_local=16); "
            "print(llm.model_path); llm.logits([5, 6, 7])")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("tiny.gguf") and str(tmp_path) in res.stdout
    code = "import lminf_gguf; lminf_gguf.LMInfinite('hf:someone/absent/x.gguf')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert res.returncode != 0 and "not in the local Hugging Face cache" in res.stderr
    with pytest.raises(ValueError, match="hf:OWNER/REPO/FILE.gguf"):
        lminf_gguf.LMInfinite("hf:only-a-repo")
