"""Misuse a library must survive: each case runs in a child process, so that an abort (SIGABRT from a GGML_ASSERT,
a segfault) fails the test instead of killing the suite. Tiny random model: fast, no default model needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)


def run_child(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # cwd: the tests folder, so that the child imports the installed package, not the source tree's
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)
    assert proc.returncode == 0, f"child died with {proc.returncode}:\n{proc.stderr[-2000:]}"
    return proc


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return str(tiny_model("f32-gqa2")[0])


@pytest.mark.parametrize("call", ["nll", "logits", "generate"])
def test_small_vanilla_n_ctx_does_not_abort(model_path, call):
    """llama.cpp caps n_batch at a small n_ctx; the engine reads back what it granted (it used to send 512 tokens
    and abort on GGML_ASSERT(n_tokens_all <= cparams.n_batch))."""
    out = run_child(f"""
        import lminf_gguf
        llm = lminf_gguf.LMInfinite({model_path!r}, mode="vanilla", n_ctx=100, n_threads=1)
        assert llm.n_batch <= 100, llm.n_batch
        tokens = [4 + i % 90 for i in range(90)]
        try:
            if {call!r} == "nll":
                print(len(llm.nll(tokens)))
            elif {call!r} == "logits":
                print(llm.logits(tokens).shape[0])
            else:
                print(type(llm.generate(tokens, max_tokens=4, temperature=0)).__name__)
            llm.nll([4 + i % 90 for i in range(1000)])   # beyond the context: a Python error
        except lminf_gguf.ContextFullError as e:
            print("ContextFullError", e)
    """)
    # the call inside the context ran (89 NLL values, 90 rows of logits, a str), then the one beyond it was refused
    assert out.stdout.split()[0] == {"nll": "89", "logits": "90", "generate": "str"}[call], out.stdout
    assert "ContextFullError" in out.stdout


def test_n_batch_above_the_lminf_cache_does_not_abort(model_path):
    """lminf with n_ubatch < n_batch and a small window: the cache (G + L + n_ubatch) is smaller than n_batch."""
    out = run_child(f"""
        import lminf_gguf
        llm = lminf_gguf.LMInfinite({model_path!r}, n_global=2, n_local=16, n_batch=512, n_ubatch=8, n_threads=1)
        print(llm.n_batch, len(llm.nll([4 + i % 90 for i in range(296)])))
    """)
    n_batch, n = map(int, out.stdout.split())
    assert n_batch <= 2 + 16 + 8 and n == 295


def test_two_threads_on_one_session_raise_instead_of_crashing(model_path):
    out = run_child(f"""
        import threading, lminf_gguf
        llm = lminf_gguf.LMInfinite({model_path!r}, n_local=16, n_threads=1)
        busy, done, other = [], [], []
        def work(seed):
            for _ in range(40):
                try:
                    llm.nll([4 + (i + seed) % 90 for i in range(200)])
                    done.append(seed)
                except lminf_gguf.SessionBusyError as e:
                    busy.append(str(e))
                except Exception as e:
                    other.append(repr(e))
        threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print(len(busy), len(done), other)
        print(busy[0] if busy else "")
    """)
    first, message = out.stdout.splitlines()[:2]
    n_busy, n_done, other = first.split(" ", 2)
    assert other == "[]" and int(n_done) > 0
    assert int(n_busy) > 0 and "another thread" in message


def test_an_unfinished_stream_holds_the_session_for_its_thread(model_path):
    """A stream in progress is a use: another thread is refused, the owning thread may go on."""
    out = run_child(f"""
        import threading, lminf_gguf
        llm = lminf_gguf.LMInfinite({model_path!r}, n_local=16, n_threads=1)
        stream = llm.eval([4 + i % 90 for i in range(96)], all_logits=False)
        next(stream)
        res = []
        t = threading.Thread(target=lambda: res.append(
            "busy" if isinstance(_try(), lminf_gguf.SessionBusyError) else "ran"))
        def _try():
            try:
                llm.nll([5, 6, 7])
            except Exception as e:
                return e
        t.start(); t.join()
        print(res[0], llm.cache_info()["n_tokens"] > 0)
        stream.close()
        t = threading.Thread(target=lambda: res.append(len(llm.nll([5, 6, 7]))))
        t.start(); t.join()
        print(res[1])
    """)
    assert out.stdout.split() == ["busy", "True", "2"]


def test_token_ids_outside_the_vocabulary_raise_instead_of_aborting(model_path):
    """llama.cpp throws std::out_of_range (uncaught: SIGABRT) on such ids in detokenize; every entry point checks."""
    out = run_child(f"""
        import lminf_gguf
        llm = lminf_gguf.LMInfinite({model_path!r}, n_local=16, n_threads=1)
        n = llm.n_vocab
        calls = [lambda t: llm.detokenize(t), lambda t: llm.nll([5, 6] + t), lambda t: llm.logits(t),
                 lambda t: llm.generate([5] + t, max_tokens=2), lambda t: llm.feed(t)]
        for bad in ([n], [-1], [10 ** 9], [2 ** 63], [1.5]):
            for call in calls:
                try:
                    call(bad)
                    print("accepted", bad)
                except (ValueError, TypeError) as e:  # a clear Python error, never an abort
                    assert "token id" in str(e) or isinstance(bad[0], float), e
        print("ok", llm.detokenize([5, 6]) is not None, len(llm.nll([5, 6, 7])))
    """)
    assert out.stdout.split() == ["ok", "True", "2"]


def test_sampling_values_are_checked_in_the_api(model_path):
    """NaN/inf temperature, top_p outside [0, 1] and the like used to be accepted silently."""
    import math

    import lminf_gguf

    llm = lminf_gguf.LMInfinite(model_path, n_local=16, n_threads=1)
    for kw in (dict(temperature=math.nan), dict(temperature=math.inf), dict(temperature=-1.0), dict(top_p=-0.1),
               dict(top_p=1.5), dict(min_p=math.nan), dict(top_k=-1), dict(top_k=2.5), dict(repeat_penalty=0.0),
               dict(seed=-3), dict(seed=2**40)):
        name = next(iter(kw))
        with pytest.raises(lminf_gguf.InvalidInputError, match=name):
            llm.generate([5, 6], max_tokens=2, **kw)
        with pytest.raises(ValueError, match=name):
            llm.create_completion([5, 6], max_tokens=2, **kw)
    assert isinstance(llm.generate([5, 6], max_tokens=2, temperature=0), str)


def test_logit_bias_and_penalties_are_checked(model_path):
    import lminf_gguf

    llm = lminf_gguf.LMInfinite(model_path, n_local=16, n_threads=1)
    for kw in (dict(logit_bias={llm.n_vocab: 1.0}), dict(logit_bias={-1: 1.0}), dict(logit_bias={"x": 1.0}),
               dict(logit_bias={5: float("nan")}), dict(logit_bias=[1, 2]), dict(frequency_penalty=3.0),
               dict(presence_penalty=float("inf"))):
        with pytest.raises(lminf_gguf.InvalidInputError):
            llm.generate([5, 6], max_tokens=2, **kw)
    # a bias of +100 makes one token the only choice; penalties run
    out = llm.create_completion([5, 6], max_tokens=3, temperature=0, logit_bias={7: 100.0}, presence_penalty=0.5)
    assert out["usage"]["completion_tokens"] == 3


def test_hostile_json_schemas_raise_instead_of_killing_the_process(model_path):
    """response_format schemas that used to end the process: {"enum": []} gave a grammar llama.cpp cannot parse
    (a NULL sampler: SIGSEGV), {"minLength": 10**9} made the converter unroll 10^9 rules (out of memory)."""
    out = run_child(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))   # an unbounded grammar fails fast here
        import lminf_gguf
        llm = lminf_gguf.LMInfinite({model_path!r}, n_local=16, n_threads=1)
        m = [{{"role": "user", "content": "x"}}]
        schemas = [{{"enum": []}}, {{"type": "string", "minLength": 10 ** 9}}, {{"type": "array", "minItems": 5000}},
                   {{"type": "string", "pattern": "^a{{1000000}}$"}}, {{"type": "nonsense"}}]
        for schema in schemas:
            try:
                llm.create_chat_completion(m, max_tokens=2, response_format={{"type": "json_schema",
                                                                             "json_schema": {{"schema": schema}}}})
                print("accepted")
            except lminf_gguf.InvalidInputError:
                print("refused")
    """)
    assert out.stdout.split() == ["refused"] * 5


def test_quantised_v_cache_without_flash_attention_is_a_clear_error(model_path):
    """llama.cpp refuses a quantised V cache without flash attention (a NULL context and a log line): named before
    it is asked."""
    code = f"""
        import lminf_gguf
        for mode in ("lminf", "lminf-topk", "vanilla"):
            try:
                lminf_gguf.LMInfinite({model_path!r}, mode=mode, n_local=16, type_v="q8_0", flash_attn=False)
            except lminf_gguf.InvalidInputError as e:
                assert "type_v='q8_0' needs flash attention" in str(e), e
            else:
                raise SystemExit("accepted")
        """
    run_child(code)


@pytest.mark.parametrize("mode", ["lminf", "lminf-topk", "mask"])
@pytest.mark.parametrize("kv", ["type_k", "type_v"])
def test_quantised_cache_on_heads_smaller_than_a_block_is_refused(model_path, mode, kv):
    """The tiny model's heads (16 values) are smaller than a q8_0/q4_0 block (32): llama.cpp refuses that for its own
    contexts only, and an LM-Infinite context with a q8_0 K cache there crashed the process (segfault)."""
    code = f"""
        import lminf_gguf
        for t in ("q8_0", "q4_0"):
            try:
                lminf_gguf.LMInfinite({model_path!r}, mode={mode!r}, n_local=16, n_batch=8, flash_attn=True,
                                      **{{{kv!r}: t}})
            except lminf_gguf.InvalidInputError as e:
                assert "blocks of 32 values" in str(e) and "heads have 16" in str(e), e
            else:
                raise SystemExit("accepted")
        """
    run_child(code)


def test_lminf_constructors_check_the_cache_types_in_llama_cpp(model_path):
    """Below the Python checks: llama_init_from_model_lminf(_topk) now run llama_init_from_model's own parameter
    checks (patch 0004). Called directly with a q8_0/q4_0 cache on 16-value heads they return NULL; they used to
    build the context and crash the process in ggml (a segfault at the first decode)."""
    code = f"""
        import lminf_gguf
        from llama_cpp import llama_cpp as llama_raw
        from lminf_gguf import _lib, context
        m = lminf_gguf.Model({model_path!r})
        topk = context.topk_params(3, 1, 8, "f16", 16, 0, 8, None)
        for kv in (("q8_0", "f16"), ("f16", "q4_0"), ("q8_0", "q8_0")):
            for flash in (True, None):
                cp = context.context_params(8, 8, 1, kv[0], kv[1], flash)
                a = _lib.llama_init_from_model_lminf(m.llama.model, cp, 2, 16, 16)
                b = _lib.llama_init_from_model_lminf_topk(m.llama.model, cp, 2, 16, 16, topk)
                print(kv, flash, bool(a), bool(b))
                assert not a and not b, (kv, flash)
        cp = context.context_params(8, 8, 1, "f16", "f16", True)   # the control: a valid cache is accepted
        a = _lib.llama_init_from_model_lminf(m.llama.model, cp, 2, 16, 16)
        assert a
        llama_raw.llama_free(a)
        """
    run_child(code)


@pytest.mark.parametrize("n_embd,n_head", [(128, 4), (192, 2)])
def test_quantised_cache_rebases_on_heads_that_are_not_a_multiple_of_64(tmp_path, n_embd, n_head):
    """Heads of 32 and 96 (Phi-3's): llama.cpp's Hadamard rotation of quantised keys needs heads of a multiple of 64,
    and its K-shift dereferenced the missing rotation matrix: the first rebase of an lminf session with a q8_0 K
    cache ended the process (SIGSEGV, patch 0003). lminf and lminf-topk (rebases; top-k also decoding one row at a
    time), shift (context shifts) and mask, each near the same run with an f16 cache."""
    from tiny_models import write_tiny_llama

    path = str(write_tiny_llama(tmp_path / "heads.gguf", seed=4, n_embd=n_embd, n_head=n_head, n_head_kv=n_head // 2))
    code = f"""
        import numpy as np
        import lminf_gguf
        tokens = [4 + (7 * i) % 90 for i in range(83)]
        for mode, n_batch in (("lminf", 7), ("lminf-topk", 1), ("lminf-topk", 7), ("mask", 7), ("shift", 7)):
            out = {{}}
            for kv in ("q8_0", "f16"):
                topk = dict(topk=3, topk_layer=0, topk_dist=8) if mode == "lminf-topk" else {{}}
                llm = lminf_gguf.LMInfinite({path!r}, mode=mode, n_global=4, n_local=16, n_batch=n_batch,
                                            type_k=kv, type_v=kv, flash_attn=True, n_threads=1, **topk)
                out[kv] = llm.logits(tokens)
                shifted = llm.cache_info().get("rebases", 0) or mode == "shift"
                llm.close()
            err = np.linalg.norm(out["q8_0"] - out["f16"]) / np.linalg.norm(out["f16"])
            print(mode, n_batch, shifted, f"{{err:.1e}}")
            assert (shifted or mode == "mask") and np.isfinite(out["q8_0"]).all() and err < 5e-2, (mode, err)
        """
    run_child(code)


def test_quantised_cache_with_flash_attention_on_the_default_model():
    """Heads of 64: a q8_0 K and V cache works with flash attention, lminf-topk included (patch 0019; the non-flash
    path it was limited to before cannot hold a quantised V cache)."""
    from conftest import DEFAULT_MODEL

    if DEFAULT_MODEL is None:
        pytest.skip("the offline default model is not installed")
    code = f"""
        import numpy as np
        import lminf_gguf
        for mode in ("lminf", "lminf-topk"):
            llm = lminf_gguf.LMInfinite({DEFAULT_MODEL!r}, mode=mode, n_global=4, n_local=64, n_batch=16,
                                        type_k="q8_0", type_v="q8_0", flash_attn=True, n_threads=2)
            assert llm.cache_info()["flash_attn"] is True
            lg = llm.logits(llm.tokenize("The quick brown fox jumps over the lazy dog. " * 30)[:300])
            assert lg.shape[0] == 300 and np.isfinite(lg).all()
        """
    run_child(code, timeout=300)
