"""Hostile model files: every mutated GGUF must fail with a Python exception, never a crash, hang or huge memory.

The files and the child-process runner are in scripts/fuzz_gguf.py (`python scripts/fuzz_gguf.py 5000` for a
longer run); docs/RELIABILITY.md lists the attacks and results.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

_spec = importlib.util.spec_from_file_location("fuzz_gguf", Path(__file__).resolve().parents[1] / "scripts" /
                                               "fuzz_gguf.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


def test_hostile_gguf_files_fail_cleanly(tmp_path):
    cases = fuzz.make_cases(str(tmp_path), 400, seed=0)
    assert len(cases) >= 300
    results = fuzz.run_files([p for p, _ in cases], timeout=30, mem_gb=4.0)
    bad = [(name, r) for (_, name), r in zip(cases, results) if r["outcome"] not in ("ok", "error")]
    assert not bad, bad[:5]
    assert results[0]["outcome"] == "ok"  # the unchanged model loads
    errors = [r for r in results if r["outcome"] == "error"]
    assert all(r["msg"] and r["type"] in ("ValueError", "FileNotFoundError", "MemoryError") for r in errors), \
        Counter(r["type"] for r in errors)
    assert len(errors) >= 0.8 * len(cases)


def test_metadata_llama_cpp_aborts_on_is_refused(tmp_path):
    import gguf

    import lminf_gguf

    base = fuzz.make_cases(str(tmp_path), 0, semantic=False)[0][0]
    V = gguf.GGUFValueType
    for i, (kv, words) in enumerate([({"llama.block_count": (0, V.UINT32)}, "block_count"),
                                      ({"llama.block_count": (1000, V.UINT32)}, "block_count"),
                                      ({"llama.rope.scaling.type": ("bogus", V.STRING)}, "rope.scaling.type"),
                                      ({"llama.attention.layer_norm_rms_epsilon": (float("nan"), V.FLOAT32)},
                                       "epsilon"),
                                      ({"tokenizer.ggml.model": ("bert", V.STRING)}, "byte tokens")]):
        p = str(tmp_path / f"m{i}.gguf")
        fuzz._rewrite(base, p, set_kv=kv)
        try:
            lminf_gguf.LMInfinite(p, n_local=16, n_threads=1)
        except ValueError as e:
            assert "invalid metadata" in str(e) and words in str(e)
        else:
            raise AssertionError(f"{kv} loaded")
    # a vocabulary without byte tokens: text with bytes it lacks is refused (llama_tokenize would abort)
    llm = lminf_gguf.LMInfinite(base, n_local=16, n_threads=1)
    try:
        llm.generate("<x>", max_tokens=1)
    except ValueError as e:
        assert "no token for byte" in str(e)
    else:
        raise AssertionError("text accepted")
    assert llm.generate([1, 5], max_tokens=2, temperature=0) is not None


def test_repeated_token_text_fails_the_load(tmp_path):
    """A vocabulary that repeats a token text (11 of 5000 byte flips in the key-value section did this) aborted
    llama.cpp; patch 0001 makes it a failed load, and the message says what is wrong."""
    import gguf

    base = fuzz.make_cases(str(tmp_path), 0, semantic=False)[0][0]
    p = str(tmp_path / "repeated.gguf")
    fuzz._rewrite(base, p, set_kv={"tokenizer.ggml.tokens": (fuzz.repeated_token_text(base, 69, 10),
                                                             gguf.GGUFValueType.ARRAY)})
    (res,) = fuzz.run_files([p], timeout=30)
    assert res["outcome"] == "error" and res["type"] == "ValueError", res
    assert "token 69 repeats the text of token 10" in res["msg"], res["msg"]


def test_metadata_that_is_not_utf8_loads(tmp_path):
    """llama.cpp loads a model whose metadata key holds a byte that is not UTF-8 (35 of the 5000 long-run files);
    reading its metadata raised UnicodeDecodeError in llama-cpp-python. Now the byte reads as U+FFFD."""
    import lminf_gguf

    base = fuzz.make_cases(str(tmp_path), 0, semantic=False)[0][0]
    _, _, _, fields, _ = fuzz._sections(base)
    f, offs = fields["general.name"]
    data = bytearray(open(base, "rb").read())
    data[offs[1]] = 0xFF  # first byte of the key text "general.name"
    p = tmp_path / "bad-key.gguf"
    p.write_bytes(bytes(data))
    with lminf_gguf.LMInfinite(str(p), n_local=16, n_threads=1) as llm:
        assert "\ufffdeneral.name" in llm.metadata
        assert llm.generate([1, 5], max_tokens=2, temperature=0) is not None
