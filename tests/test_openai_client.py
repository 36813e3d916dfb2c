"""Conformance: the official `openai` Python client (a test extra) against a running `lminf serve --parallel 2` on
the default model: models, completions and chat (plain, stream, stop, seed, logprobs, n = 2, json_schema, max
completion tokens, include_usage), a CORS preflight, and two streams served at once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import DEFAULT_MODEL, needs_default_model

openai = pytest.importorskip("openai", reason="the openai client is a test extra (pip install -e '.[test]')")

EXE = str(Path(sys.executable).with_name("lminf"))
ORIGIN = "http://localhost:3000"
MODEL_ID = Path(DEFAULT_MODEL).name if DEFAULT_MODEL else "none"


@pytest.fixture(scope="module")
def served():
    """`lminf serve` in a child process on a free port; yields (base url, process)."""
    proc = subprocess.Popen([EXE, "serve", "--port", "0", "--parallel", "2", "--n-local", "256", "--threads", "1",
                             "--quiet", "--cors-origin", ORIGIN], stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent)
    try:
        url = None
        deadline = time.time() + 120
        while url is None and time.time() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"on (http://\S+)/v1", line)
            url = m.group(1) if m else None
        assert url, f"lminf serve did not start (rc {proc.poll()})"
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=300)


@needs_default_model
def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-none")


@needs_default_model
def test_completions(client):
    out = client.completions.create(model=MODEL_ID, prompt="The capital of France is", max_tokens=6,
                                    temperature=0, logprobs=2, n=2, seed=3)
    assert [c.index for c in out.choices] == [0, 1] and out.choices[0].text == out.choices[1].text
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and all(x <= 0 for x in lp.token_logprobs)
    assert out.usage.completion_tokens == 12
    stopped = client.completions.create(model=MODEL_ID, prompt="One, two, three, four,", max_tokens=16,
                                        temperature=0, stop=[","])
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=1.0,
                                      seed=7).choices[0].text for _ in range(2))
    assert a == b  # a seed repeats
    chunks = list(client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


@needs_default_model
def test_chat(client):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_completion_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 5
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    stream = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: streamed = whole
    assert chunks[-1].usage.total_tokens > 0
    two = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=4, n=2, temperature=1.0,
                                         seed=1)
    assert [c.index for c in two.choices] == [0, 1]


@needs_default_model
def test_json_schema_reply_is_valid_json_matching_the_schema(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Give the largest city of France as JSON."}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    reply = json.loads(out.choices[0].message.content)
    assert set(reply) == {"city", "population"}
    assert isinstance(reply["city"], str) and len(reply["city"]) <= 20 and isinstance(reply["population"], int)


@needs_default_model
def test_refused_fields_are_named(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert "tools" in str(e.value)


@needs_default_model
def test_cors_preflight(served):
    req = urllib.request.Request(served[0] + "/v1/chat/completions", method="OPTIONS", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]


def _health(url):
    with urllib.request.urlopen(url + "/health", timeout=30) as resp:
        return json.loads(resp.read())


@needs_default_model
def test_two_streams_at_once(served, client):
    """A long stream holds one slot; a second stream is served to its end meanwhile on the other slot."""
    url = served[0]
    eos = client.post("/tokenize", body={"content": "<|im_end|>", "add_special": False}, cast_to=object)
    long = client.completions.create(model=MODEL_ID, prompt="Count: one, two,", max_tokens=4096, temperature=0,
                                     stream=True, logit_bias={str(t): -100 for t in eos["tokens"] + [0]})
    first = next(iter(long))
    assert first.choices[0].text is not None
    assert _health(url)["slots_processing"] == 1
    short = list(client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=4, stream=True))
    assert short[-1].choices[0].finish_reason in ("stop", "length")
    # the long one (4096 tokens, tens of seconds on a CPU) was still running on its slot meanwhile (the short
    # one's slot is released just after its last byte: give its handler a moment)
    deadline = time.time() + 10
    while _health(url)["slots_processing"] > 1 and time.time() < deadline:
        time.sleep(0.05)
    assert _health(url)["slots_processing"] == 1
    long.close()  # a client that leaves frees its slot
    deadline = time.time() + 60
    while _health(url)["slots_processing"] and time.time() < deadline:
        time.sleep(0.1)
    assert _health(url) == {"status": "ok", "slots_idle": 2, "slots_processing": 0}
