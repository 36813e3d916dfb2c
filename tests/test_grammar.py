"""grammar.py: every grammar bounded before llama.cpp's recursive parser sees it. The schemas and patterns that used
to kill `lminf serve` (a SIGSEGV from 10^6 nested groups, a SIGABRT from a 10^9-character literal) are refused by
name; the parse at the bounds fits a 1 MiB stack (child processes, so a crash fails the test, not the suite); a
seeded slice of scripts/fuzz_grammar.py runs against a real server."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from conftest import needs_default_model

from lminf_gguf import InvalidInputError, grammar

HERE = Path(__file__).resolve().parent


def run_child(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)


@pytest.mark.parametrize("pattern, named", [
    ("^a{,1000000}$", "above 1000"),              # the minimum left out: the SIGSEGV
    ("^a{1_000_000_000}$", "ASCII digits"),        # underscores, which int() reads: the SIGABRT
    ("^a{100_000_000}$", "ASCII digits"),          # 2.3 GB and 14 s of a slot
    ("^a{\uff15\uff10}$", "ASCII digits"),         # full-width digits
    ("^a{\u0665\u0660,}$", "ASCII digits"),        # Arabic-Indic digits
    ("^a{1000000,}$", "above 1000"),
    ("^a{5,99999999999999999999}$", "above 1000"),
    ("((a{1000}){1000}){1000}", "expands to more than"),   # each repeat in bounds, their product not
    ("(" * 100 + "a" + ")" * 100, "deeper than"),
    ("(a{,1000}){,1000}", "expands to more than"),
    ("a{,}", "not {N}"),
    ("a{2,", "unbalanced"),
])
def test_hostile_patterns_are_refused_by_name(pattern, named):
    with pytest.raises(InvalidInputError, match="response_format") as e:
        grammar.from_schema({"type": "string", "pattern": pattern}, "response_format")
    assert named in str(e.value)


@pytest.mark.parametrize("schema, named", [
    ({"type": "string", "maxLength": 10 ** 9}, "maxLength"),
    ({"type": "array", "minItems": 5000}, "minItems"),
    ({"type": "array", "maxItems": float("nan")}, "maxItems"),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(6000)}}, "more than 10000 values"),
    ({"enum": list(range(600))}, "enum has 600 alternatives"),
    ({"anyOf": [{"const": i} for i in range(600)]}, "anyOf has 600"),
    ({"$ref": "#"}, "no grammar"),
    ({"type": "nonsense"}, "no grammar"),
])
def test_hostile_schemas_are_refused_by_name(schema, named):
    with pytest.raises(InvalidInputError) as e:
        grammar.from_schema(schema, "tools[0].function.parameters")
    assert "tools[0].function.parameters" in str(e.value) and named in str(e.value)


def test_deep_schema_and_generated_grammar_bounds():
    deep = {"type": "string"}
    for _ in range(grammar.MAX_SCHEMA_DEPTH):
        deep = {"type": "array", "items": deep}
    with pytest.raises(InvalidInputError, match="nests deeper"):
        grammar.check_schema(deep, "x")
    with pytest.raises(InvalidInputError, match="nests groups deeper"):
        grammar.check_gbnf('root ::= ' + '("a" ' * (grammar.MAX_GBNF_DEPTH + 1) + ')?' * (grammar.MAX_GBNF_DEPTH + 1))
    with pytest.raises(InvalidInputError, match="more than 4096 rules"):
        grammar.check_gbnf("".join(f'r{i} ::= "x"\n' for i in range(grammar.MAX_GBNF_RULES + 1)))
    with pytest.raises(InvalidInputError, match="larger than"):
        grammar.check_gbnf('root ::= "' + "a" * grammar.MAX_GBNF_BYTES + '"')
    # parentheses inside literals and classes are not groups
    grammar.check_gbnf('root ::= "' + "(" * 500 + '" [(]' + " [)]" * 3)


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 1000},
    {"type": "string", "pattern": "^[a-z]{3,10}-\\d{2}$"},
    {"type": "string", "pattern": "^a{,1000}$"},
    {"type": "string", "pattern": "^\\{9999\\}[{]$"},    # escaped and class braces are literals, not repeats
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -1e300, "maximum": 1e300}},
     "required": ["n"]},
    {"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}},   # recursive
     "type": "object", "properties": {"head": {"$ref": "#/$defs/node"}}},
])
def test_ordinary_schemas_still_build(schema):
    assert "root ::=" in grammar.schema_gbnf(schema, "response_format")


def test_a_grammar_given_directly_is_bounded_too(tiny_model):
    """The Python API's grammar= (a LlamaGrammar built by the caller) passes the same check."""
    import lminf_gguf
    from lminf_gguf._lib import llama_cpp
    with lminf_gguf.LMInfinite(str(tiny_model("f32-gqa2")[0]), n_local=16, n_threads=1) as llm:
        bad = llama_cpp.llama_grammar.LlamaGrammar.from_string('root ::= ' + '("a" ' * 5000 + ')?' * 5000,
                                                               verbose=False)
        with pytest.raises(InvalidInputError, match="nests groups deeper"):
            llm.generate([5, 6], max_tokens=2, grammar=bad)


@needs_default_model
def test_the_unchecked_parse_would_crash_and_the_bounds_fit_a_1_mib_stack():
    """The guard: llama.cpp's parser, handed the converter's output for `a{,100000}` directly, overflows a thread's
    stack (so the check is what keeps the process alive); at the bounds (groups nested MAX_GBNF_DEPTH deep, a
    leftmost chain of MAX_GBNF_RULES rules) it parses in a thread with a 1 MiB stack (Python threads get 8)."""
    code = """
        import resource, sys, threading
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        from lminf_gguf import Model, grammar
        from lminf_gguf._lib import llama_raw
        vocab = llama_raw.llama_model_get_vocab(Model().llama.model)
        kind, n = sys.argv[1], int(sys.argv[2])
        text = ('root ::= ' + '("a" ' * n + ')?' * n if kind == "nested" else
                "root ::= r0\\n" + "".join(f'r{i} ::= r{i + 1} "x"\\n' for i in range(n)) + f'r{n} ::= "x"')
        def parse():
            print(kind, bool(llama_raw.llama_sampler_init_grammar(vocab, text.encode(), b"root")), flush=True)
        threading.stack_size(1 << 20)
        t = threading.Thread(target=parse)
        t.start()
        t.join()
    """
    code = textwrap.dedent(code)
    nested = subprocess.run([sys.executable, "-c", code, "nested", str(grammar.MAX_GBNF_DEPTH)], capture_output=True,
                            text=True, timeout=120, cwd=HERE)
    # at this depth llama.cpp may refuse the grammar (its own repetition threshold): a NULL, not a crash
    assert nested.returncode == 0 and nested.stdout.split()[:1] == ["nested"], nested.stderr[-1500:]
    chain = subprocess.run([sys.executable, "-c", code, "chain", str(grammar.MAX_GBNF_RULES)], capture_output=True,
                           text=True, timeout=120, cwd=HERE)
    assert chain.returncode == 0 and chain.stdout.split()[-2:] == ["chain", "True"], chain.stderr[-1500:]
    unchecked = subprocess.run([sys.executable, "-c", code, "nested", "100000"], capture_output=True, text=True,
                               timeout=120, cwd=HERE)
    assert unchecked.returncode < 0, "the parser survived 10^5 nested groups: the bounds may be loosened"


_spec = importlib.util.spec_from_file_location("fuzz_grammar", HERE.parent / "scripts" / "fuzz_grammar.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


@needs_default_model
def test_the_server_refuses_the_reproductions_and_stays_healthy():
    """The issue's two killers and their variants over HTTP: 400s naming the bound, then an ordinary schema is
    still answered by the same process."""
    server = fuzz.fuzz_server.Server(fuzz.default_model())
    try:
        def chat(schema, **extra):
            body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 8,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "f", "schema": schema}}}
            return fuzz.request(server.port, fuzz.post(json.dumps({**body, **extra})), 60)
        for pattern in ("^a{,1000000}$", "^a{1_000_000_000}$", "^a{100_000_000}$", "^a{\uff15\uff10\uff10}$"):
            status, body = chat({"type": "string", "pattern": pattern})
            assert status == 400 and "pattern" in body["error"]["message"], (pattern, status, body)
            assert server.alive()
        status, body = chat({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["message"]["content"].lstrip().startswith("{"), choice
        if choice["finish_reason"] == "stop":
            assert json.loads(choice["message"]["content"])["ok"] in (True, False)
    finally:
        server.stop()


@needs_default_model
def test_fuzzed_schemas_slice():
    results, peak = fuzz.run(150, seed=11, timeout=30.0, slow=10.0, log=lambda s: None)
    counts = Counter(o for _, o, _ in results)
    assert not [r for r in results if r[1] in fuzz.FAILURES], counts
    assert counts["4xx"] >= 30 and counts["2xx"] >= 10, counts
    assert peak < 1024, peak


@needs_default_model
def test_a_grammar_no_token_can_follow_ends_the_reply_instead_of_the_process():
    """Found by the fuzzer: {"enum": ["\\u0000"]} asks for a NUL that no token spells, every candidate is ruled
    out, and llama.cpp's grammar threw on accepting the one greedy picked anyway ("Unexpected empty grammar stack"):
    an uncaught C++ exception, SIGABRT. Now the reply ends there (or, before its first token, a 400)."""
    proc = run_child("""
        import lminf_gguf
        llm = lminf_gguf.LMInfinite(n_local=64, n_threads=1)
        for schema in ({"enum": ["\\u0000"]}, {"const": "\\u0001\\u0002"}, {"type": "string", "pattern": "^\\u0000+$"}):
            for stream in (False, True):
                try:
                    out = llm.create_chat_completion([{"role": "user", "content": "x"}], max_tokens=8, stream=stream,
                        response_format={"type": "json_schema", "json_schema": {"schema": schema}})
                    print("finish", list(out)[-1]["choices"][0]["finish_reason"] if stream
                          else out["choices"][0]["finish_reason"])
                except lminf_gguf.InvalidInputError:
                    print("refused")
    """)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert len(proc.stdout.split("\n")) >= 6 and "length" not in proc.stdout, proc.stdout
