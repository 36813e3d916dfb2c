"""`lminf serve`: the OpenAI-compatible HTTP server, over a real HTTP client.

The protocol tests (errors, SSE framing, disconnects, API key) run against a small fake engine that follows the
create_completion / create_chat_completion contract, so they need no model; the end-to-end tests run the offline
default model with a 256-token window."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import N_GPU_LAYERS, needs_default_model, DEFAULT_MODEL

import lminf_gguf
from lminf_gguf.server import make_server
from lminf_gguf.slots import SlotPool, open_sessions

needs_model = needs_default_model


# -- helpers ------------------------------------------------------------------------------------------------------

class Running:
    """A server serving in a background thread; stop() shuts it down."""

    def __init__(self, llm, **kw):
        self.server = make_server(llm, "127.0.0.1", 0, **kw)
        self.host, self.port = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def request(self, method, path, body=None, headers=None, raw=None, timeout=120):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8")
        conn.close()
        return resp.status, resp.getheader("Content-Type", ""), text

    def json(self, method, path, body=None, **kw):
        status, ctype, text = self.request(method, path, body, **kw)
        assert ctype.startswith("application/json"), (status, ctype, text)
        return status, json.loads(text)

    def sse(self, path, body, **kw):
        """(status, [chunk dicts], saw_done) of a streamed request."""
        status, ctype, text = self.request("POST", path, body, **kw)
        assert status == 200, text
        assert ctype.startswith("text/event-stream")
        events = [e for e in text.split("\n\n") if e.strip()]
        assert all(e.startswith("data: ") for e in events), events
        payloads = [e[len("data: "):] for e in events]
        assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
        return [json.loads(p) for p in payloads[:-1]]

    def disconnect_mid_stream(self, path, body):
        """Start a stream, read its first event, then drop the connection."""
        sock = socket.create_connection((self.host, self.port), timeout=60)
        data = json.dumps(body).encode()
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        got = b""
        while b"data: " not in got:
            part = sock.recv(4096)
            assert part, got
            got += part
        assert got.startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        sock.close()


def wait_unlocked(srv, timeout=10.0):
    """A slot is released just after the response is sent: give the handler thread a moment."""
    deadline = time.time() + timeout
    while srv.server.pool.busy() and time.time() < deadline:
        time.sleep(0.01)
    return not srv.server.pool.busy()


def assert_error(status, body, want_status):
    assert status == want_status, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert {"type", "param", "code"} <= set(err)


# -- a fake engine with the create_*completion contract -----------------------------------------------------------

class FakeLLM:
    model_path = "/models/fake.gguf"

    def __init__(self, delay=0.0):
        self.delay = delay
        self.calls = []
        self.streams_open = 0
        self.streams_closed = 0
        self.cancelled = threading.Event()
        self.n_cancelled = 0

    def cancel(self):
        self.cancelled.set()

    def _pieces(self, max_tokens):
        for i in range(max_tokens if max_tokens is not None else 10 ** 9):
            if self.cancelled.is_set():
                self.n_cancelled += 1
                return
            if self.delay:
                time.sleep(self.delay)
            yield f"w{i} "

    def create_completion(self, prompt, max_tokens=16, temperature=0.8, top_p=0.95, top_k=40, min_p=0.05,
                          repeat_penalty=1.0, seed=None, stop=None, stream=False):
        self.cancelled.clear()
        self.calls.append(dict(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed, stop=stop))
        if prompt == "explode":  # the engine's way of saying "your input": lminf_gguf.InvalidInputError
            raise lminf_gguf.InvalidInputError("bad prompt for the engine")
        if prompt == "internal":  # a ValueError that is not about the input is ours: 500
            raise ValueError("an internal ValueError")
        if prompt == "bug":
            raise KeyError("a bug in the engine")
        if prompt == "server gone":  # an RPC server that computed the layers went away (patch 0021)
            raise lminf_gguf.RemoteServerError("RPC server 10.0.0.2:50052 went away")
        base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": self.model_path}
        if not stream:
            text = "".join(self._pieces(max_tokens))
            return {**base, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": max_tokens,
                              "total_tokens": 1 + max_tokens}}

        def gen():
            self.streams_open += 1
            try:
                for piece in self._pieces(max_tokens):
                    yield {**base, "choices": [{"text": piece, "index": 0, "logprobs": None,
                                                "finish_reason": None}]}
                yield {**base, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]}
            finally:
                self.streams_closed += 1
        return gen()

    def create_chat_completion(self, messages, max_tokens=None, temperature=0.2, top_p=0.95, top_k=40,
                               min_p=0.05, repeat_penalty=1.0, seed=None, stop=None, stream=False):
        self.cancelled.clear()
        self.calls.append(dict(messages=messages, max_tokens=max_tokens, stop=stop, temperature=temperature))
        base = {"id": "chatcmpl-1", "created": 1, "model": self.model_path}
        n = max_tokens or 4
        if not stream:
            return {**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(self._pieces(n))},
                 "logprobs": None, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}}

        def gen():
            self.streams_open += 1
            try:
                base["object"] = "chat.completion.chunk"
                yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                            "finish_reason": None}]}
                for piece in self._pieces(n):
                    yield {**base, "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None,
                                                "finish_reason": None}]}
                    if piece == "w2 " and messages[-1]["content"] == "fail mid-stream":
                        raise RuntimeError("boom")
                yield {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]}
            finally:
                self.streams_closed += 1
        return gen()


@pytest.fixture
def fake():
    llm = FakeLLM()
    srv = Running(llm)
    yield srv, llm
    srv.stop()


def test_fake_models_health_and_completion(fake):
    srv, llm = fake
    assert srv.json("GET", "/health") == (200, {"status": "ok", "slots_idle": 1, "slots_processing": 0})
    status, models = srv.json("GET", "/v1/models")
    assert status == 200 and models["object"] == "list" and models["data"][0]["id"] == "fake.gguf"
    status, out = srv.json("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 3, "stop": "x",
                                                       "temperature": 0, "seed": 5, "model": "anything"})
    assert status == 200 and out["choices"][0]["text"] == "w0 w1 w2 " and out["model"] == "fake.gguf"
    assert llm.calls[-1] == dict(prompt="hi", max_tokens=3, temperature=0.0, top_p=0.95, top_k=40, min_p=0.05,
                                 repeat_penalty=1.0, seed=5, stop=["x"])
    # defaults: 16 tokens for completions, None (the engine's choice) for chat; /v1 is optional
    assert srv.json("POST", "/completions", {"prompt": ["hi"]})[0] == 200 and llm.calls[-1]["max_tokens"] == 16
    status, out = srv.json("POST", "/v1/chat/completions", {"messages": [
        {"role": "system", "content": None}, {"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]})
    assert status == 200 and out["choices"][0]["message"]["content"]
    assert llm.calls[-1]["messages"] == [{"role": "system", "content": ""}, {"role": "user", "content": "ab"}]
    assert llm.calls[-1]["max_tokens"] is None and llm.calls[-1]["temperature"] == 0.2


def test_fake_streaming_chat(fake):
    srv, llm = fake
    chunks = srv.sse("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                                              "stream": True})
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 5
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "w0 w1 w2 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert llm.streams_closed == llm.streams_open == 1


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": 3}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": ["a", 5]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", ""]}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 17}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"], "n": 9}, "n"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "echo": "yes"}, "echo"),
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "a", "stream": True, "stream_options": {"usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "a", "max_tokens": "8"}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
    ("/v1/completions", {"prompt": "a", "temperature": True}, "temperature"),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "a", "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": "a", "stop": [1]}, "stop"),
    ("/v1/completions", {"prompt": "a", "stream": "yes"}, "stream"),
    ("/v1/completions", {"prompt": "a", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "a", "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 2}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": ["hi"]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
])
def test_fake_bad_fields_are_400(fake, path, body, field):
    srv, llm = fake
    status, out = srv.json("POST", path, body)
    assert_error(status, out, 400)
    assert out["error"]["param"] == field and out["error"]["type"] == "invalid_request_error"
    assert not llm.calls


def test_fake_bad_requests(fake):
    srv, llm = fake
    for raw in (b"{not json", b"[1, 2]", b'{"prompt": NaN}', b"\xff\xfe"):
        status, ctype, text = srv.request("POST", "/v1/completions", raw=raw)
        assert_error(status, json.loads(text), 400)
    assert_error(*srv.json("GET", "/v1/nothing"), 404)
    assert_error(*srv.json("POST", "/v2/completions", {"prompt": "a"}), 404)
    assert_error(*srv.json("GET", "/v1/completions"), 405)
    assert_error(*srv.json("POST", "/v1/models", {}), 405)
    # the engine's InvalidInputError is the client's fault, also when streaming (before any byte is sent)
    assert_error(*srv.json("POST", "/v1/completions", {"prompt": "explode"}), 400)
    assert_error(*srv.json("POST", "/v1/completions", {"prompt": "explode", "stream": True}), 400)
    # any other exception is ours (errors.CLIENT_ERRORS decides)
    assert_error(*srv.json("POST", "/v1/completions", {"prompt": "internal"}), 500)
    # an RPC server that went away: the service is unavailable until it is back, not a bug of ours
    status, out = srv.json("POST", "/v1/completions", {"prompt": "server gone"})
    assert_error(status, out, 503)
    assert out["error"]["code"] == "unavailable" and "went away" in out["error"]["message"]
    # anything else is the server's fault: 500, and the lock is free again
    status, out = srv.json("POST", "/v1/completions", {"prompt": "bug"})
    assert_error(status, out, 500)
    assert out["error"]["type"] == "server_error" and wait_unlocked(srv)
    assert srv.json("GET", "/health")[0] == 200


def test_fake_error_mid_stream_is_reported_in_the_stream(fake):
    srv, llm = fake
    chunks = srv.sse("/v1/chat/completions", {"messages": [{"role": "user", "content": "fail mid-stream"}],
                                              "stream": True, "max_tokens": 8})
    assert "boom" in chunks[-1]["error"]["message"]
    assert llm.streams_closed == llm.streams_open == 1


def test_fake_disconnect_stops_generation_and_frees_the_lock():
    llm = FakeLLM(delay=0.01)
    srv = Running(llm, max_tokens_limit=10 ** 6)  # an operator may allow long replies
    try:
        # an endless stream: only the disconnect can stop it
        srv.disconnect_mid_stream("/v1/completions", {"prompt": "a", "max_tokens": 10 ** 6, "stream": True})
        deadline = time.time() + 10
        while llm.streams_closed < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert llm.streams_closed == llm.streams_open == 1
        assert wait_unlocked(srv)
        status, out = srv.json("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})
        assert status == 200 and out["choices"][0]["text"] == "w0 w1 "
    finally:
        srv.stop()


def test_fake_disconnect_cancels_a_non_streamed_request():
    llm = FakeLLM(delay=0.01)
    srv = Running(llm, max_tokens_limit=10 ** 6)  # an operator may allow long replies
    try:
        sock = socket.create_connection((srv.host, srv.port), timeout=60)
        data = json.dumps({"prompt": "a", "max_tokens": 10 ** 6}).encode()
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                     + data)
        deadline = time.time() + 10
        while not llm.calls and time.time() < deadline:
            time.sleep(0.02)
        sock.close()
        while llm.n_cancelled < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert llm.n_cancelled == 1
        status, out = srv.json("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})
        assert status == 200 and out["choices"][0]["text"] == "w0 w1 "
        assert wait_unlocked(srv)
    finally:
        srv.stop()


def test_fake_requests_are_serialised():
    llm = FakeLLM(delay=0.005)
    active, peak = [0], [0]
    inner = llm.create_completion

    def counted(**kw):
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            return inner(**kw)
        finally:
            active[0] -= 1

    llm.create_completion = counted
    srv = Running(llm)
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            srv.json("POST", "/v1/completions", {"prompt": "a", "max_tokens": 10})[0])) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == [200] * 4 and peak[0] == 1
    finally:
        srv.stop()


def test_fake_api_key():
    srv = Running(FakeLLM(), api_key="sesame")
    try:
        assert srv.json("GET", "/health")[0] == 200  # health needs no key
        assert_error(*srv.json("GET", "/v1/models"), 401)
        assert_error(*srv.json("GET", "/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert srv.json("GET", "/v1/models", headers={"Authorization": "Bearer sesame"})[0] == 200
        status, _ = srv.json("POST", "/v1/completions", {"prompt": "a", "max_tokens": 1},
                             headers={"Authorization": "Bearer sesame"})
        assert status == 200
    finally:
        srv.stop()


def test_serve_help():
    exe = Path(sys.executable).with_name("lminf")
    res = subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for flag in ("--model", "--host", "--port", "--mode", "--n-global", "--n-local", "--dist-max", "--threads",
                 "--api-key"):
        assert flag in res.stdout


# -- end to end on the default model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real():
    llm = lminf_gguf.LMInfinite(n_local=256, n_threads=2, n_gpu_layers=N_GPU_LAYERS)
    srv = Running(llm)
    yield srv, llm
    srv.stop()
    llm.close()


@needs_model
def test_real_models(real):
    srv, llm = real
    status, out = srv.json("GET", "/v1/models")
    assert status == 200 and out["data"][0]["id"] == Path(DEFAULT_MODEL).name


def _usage_ok(usage):
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@needs_model
def test_real_completion(real):
    srv, llm = real
    status, out = srv.json("POST", "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8,
                                                       "temperature": 0})
    assert status == 200, out
    assert out["object"] == "text_completion" and out["model"] == Path(DEFAULT_MODEL).name
    choice = out["choices"][0]
    assert isinstance(choice["text"], str) and choice["text"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    _usage_ok(out["usage"])


@needs_model
def test_real_chat_completion(real):
    srv, llm = real
    status, out = srv.json("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8,
        "temperature": 0})
    assert status == 200, out
    assert out["object"] == "chat.completion"
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"].strip()
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    _usage_ok(out["usage"])


@needs_model
def test_real_streaming_chat(real):
    srv, llm = real
    body = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 8, "temperature": 0}
    chunks = srv.sse("/v1/chat/completions", {**body, "stream": True})
    assert chunks and all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # greedy: the stream says what the non-streamed answer says
    status, out = srv.json("POST", "/v1/chat/completions", body)
    assert status == 200 and out["choices"][0]["message"]["content"] == text


@needs_model
def test_real_chat_longer_than_the_window(real):
    srv, llm = real
    turn = ("Tell me about the history of the printing press in Europe, from Gutenberg's movable type to the "
            "spread of print shops across the continent.")
    messages = []
    for i in range(12):
        messages += [{"role": "user", "content": f"{i}. {turn}"},
                     {"role": "assistant", "content": f"Answer {i}: it spread quickly through trade cities."}]
    messages.append({"role": "user", "content": "Summarise in one sentence."})
    assert len(llm.tokenize(" ".join(m["content"] for m in messages))) > llm.n_local
    status, out = srv.json("POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 8,
                                                            "temperature": 0})
    assert status == 200, out
    assert out["usage"]["prompt_tokens"] > 600
    assert isinstance(out["choices"][0]["message"]["content"], str)
    info = llm.cache_info()
    assert info["cells_used"] <= info["cells_bound"]


@needs_model
def test_real_bad_requests(real):
    srv, llm = real
    assert_error(*srv.json("POST", "/v1/chat/completions", {"messages": [{"content": "hi"}]}), 400)
    assert_error(*srv.json("POST", "/v1/completions", {"max_tokens": 4}), 400)
    status, ctype, text = srv.request("POST", "/v1/chat/completions", raw=b'{"messages": [')
    assert_error(status, json.loads(text), 400)
    assert_error(*srv.json("GET", "/v1/engines"), 404)


@needs_model
def test_real_disconnect_mid_stream_then_a_normal_request(real):
    srv, llm = real
    srv.disconnect_mid_stream("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 16,
        "stream": True})
    status, out = srv.json("POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4,
                                                       "temperature": 0})
    assert status == 200 and out["choices"][0]["text"]
    assert wait_unlocked(srv)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


@needs_model
@pytest.mark.parametrize("parallel", [1, 4])
def test_load_eight_streaming_clients_with_disconnects(parallel):
    """200 streamed completions from 8 concurrent clients, every fifth dropped after its first event: no error,
    the server stays healthy, and the process RSS stays flat after warm-up; with one slot and with four."""
    pool = open_sessions(DEFAULT_MODEL, parallel, n_local=128, n_batch=32, n_threads=max(1, 2 // parallel),
                         n_gpu_layers=N_GPU_LAYERS)
    llm = pool
    srv = Running(pool)
    counts = {"done": 0, "dropped": 0}
    errors, rss = [], {}
    lock = threading.Lock()

    def client(c):
        for r in range(25):
            body = {"prompt": f"Number {25 * c + r} is", "max_tokens": 4, "stream": True, "temperature": 0.7,
                    "seed": r}
            try:
                if r % 5 == 4:
                    srv.disconnect_mid_stream("/v1/completions", body)
                    key = "dropped"
                else:
                    chunks = srv.sse("/v1/completions", body)
                    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length"), chunks[-1]
                    key = "done"
                with lock:
                    counts[key] += 1
                    if sum(counts.values()) == 40:
                        rss["warm"] = rss_mb()
            except Exception as e:  # reported below with the others
                errors.append(f"client {c} request {r}: {e!r}")

    try:
        threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        rss["end"] = rss_mb()
        assert not errors, errors[:5]
        assert counts == {"done": 160, "dropped": 40}
        assert wait_unlocked(srv)  # dropped requests free their slot when their handler notices
        assert srv.json("GET", "/health") == (200, {"status": "ok", "slots_idle": parallel, "slots_processing": 0})
        assert rss["end"] - rss["warm"] < 0.05 * rss["warm"], rss
    finally:
        srv.stop()
        llm.close()


def _raw(srv, head: bytes, body: bytes = b"", timeout=10) -> bytes:
    """Send a raw request, return the raw response (until the server closes or 64 KB)."""
    sock = socket.create_connection((srv.host, srv.port), timeout=timeout)
    sock.sendall(head + body)
    got = b""
    try:
        while len(got) < 65536:
            part = sock.recv(65536)
            if not part:
                break
            got += part
            if b"\r\n\r\n" in got:
                hdr, _, rest = got.partition(b"\r\n\r\n")
                n = next((int(ln.split(b":")[1]) for ln in hdr.split(b"\r\n")
                          if ln.lower().startswith(b"content-length:")), None)
                if n is not None and len(rest) >= n:
                    break
    finally:
        sock.close()
    return got


def test_fake_hostile_bodies_get_a_4xx_not_a_hang_or_a_500(fake):
    """Issue 16's attacks on the body reader: each is answered at once with a client error."""
    srv, llm = fake
    status_of = lambda raw: int(raw.split(b" ", 2)[1])  # noqa: E731
    # a negative chunk size used to become rfile.read(-1): a read without limit
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    assert status_of(_raw(srv, head, b"-1\r\n")) == 400
    # chunked and Content-Length together: the server used to wait for the client to give up
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nContent-Length: 10\r\n\r\n")
    assert status_of(_raw(srv, head, b"5\r\n{\"a\":\r\n")) == 400
    # a cross-origin "simple" POST (text/plain) is never processed
    status, ctype, text = srv.request("POST", "/v1/completions", {"prompt": "hi"},
                                      headers={"Content-Type": "text/plain"})
    assert status == 415 and json.loads(text)["error"]["code"] == "unsupported_media_type"
    # 100k-deep JSON (RecursionError) and an integer without a float (OverflowError) used to give 500
    deep = b"[" * 100000 + b"]" * 100000
    assert_error(*srv.json("POST", "/v1/completions", raw=deep), 400)
    assert_error(*srv.json("POST", "/v1/completions", raw=b'{"prompt": "a", "temperature": 1' + b"0" * 400 + b"}"), 400)
    assert_error(*srv.json("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2 ** 63}), 400)
    assert llm.calls == []


def test_fake_max_tokens_is_capped(fake):
    srv, llm = fake
    limit = srv.server.max_tokens_limit
    status, body = srv.json("POST", "/v1/completions", {"prompt": "a", "max_tokens": limit + 1})
    assert_error(status, body, 400)
    assert body["error"]["param"] == "max_tokens" and str(limit) in body["error"]["message"]
    assert srv.json("POST", "/v1/completions", {"prompt": "a", "max_tokens": 3})[0] == 200


def test_fake_head_gets_405_with_allow_and_no_body(fake):
    srv, _ = fake
    for method, path, allowed in (("HEAD", "/v1/models", "GET"), ("HEAD", "/v1/chat/completions", "POST")):
        raw = _raw(srv, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0].split(b" ")[1] == b"405", raw
        assert f"Allow: {allowed}".encode() in lines
        if method == "HEAD":
            assert body == b""


def test_fake_bodies_being_read_share_one_budget(fake, monkeypatch):
    """Parallel large bodies no longer add up: past the server-wide budget a body is refused with 503."""
    import lminf_gguf.handler as server_module  # the budgets live with the HTTP handler

    srv, llm = fake
    monkeypatch.setattr(server_module, "MAX_BODIES_BYTES", 100)
    body = json.dumps({"prompt": "a" * 200}).encode()
    status, ctype, text = srv.request("POST", "/v1/completions", raw=body)
    assert status == 503 and json.loads(text)["error"]["code"] == "busy"
    monkeypatch.setattr(server_module, "MAX_BODIES_BYTES", 1 << 20)
    assert srv.json("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200


def _hold_the_slot(srv, llm, seconds):
    """A request that keeps the only slot busy for about `seconds` (a thread); returns the thread."""
    llm.delay = seconds / 20
    t = threading.Thread(target=srv.json, args=("POST", "/v1/completions", {"prompt": "a", "max_tokens": 20}))
    t.start()
    deadline = time.time() + 10
    while not llm.calls and time.time() < deadline:
        time.sleep(0.01)
    return t


def test_fake_waiting_requests_hold_their_share_of_the_memory_budget():
    """Parsed requests waiting for a busy slot count against the budget until they end (they used to count only
    while their body was read: 40 waiting 16 MiB prompts could exhaust the host): past it, 503 + Retry-After."""
    llm = FakeLLM()
    body = {"prompt": list(range(50000)), "max_tokens": 1}          # ~330 kB of JSON, 8x that once parsed
    size = len(json.dumps(body))
    srv = Running(llm, memory_budget=size * 8 * 3 + size)          # room for three waiting requests
    try:
        holder = _hold_the_slot(srv, llm, 3.0)
        got = []
        threads = [threading.Thread(target=lambda: got.append(srv.request("POST", "/v1/completions", body)))
                   for _ in range(6)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join(60)
        holder.join(60)
        statuses = sorted(status for status, _, _ in got)
        assert statuses == [200] * 3 + [503] * 3, statuses
        refused = [text for status, _, text in got if status == 503]
        assert all(json.loads(t)["error"]["code"] == "busy" and "memory budget" in t for t in refused)
        deadline = time.time() + 10   # a handler gives its reservation back just after its answer is sent
        while srv.server._bodies_bytes and time.time() < deadline:
            time.sleep(0.01)
        assert srv.server._bodies_bytes == 0      # every reservation was given back
        assert srv.json("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200
    finally:
        srv.stop()


def test_fake_queue_length_is_bounded():
    llm = FakeLLM()
    srv = Running(llm, max_queue=2)
    try:
        holder = _hold_the_slot(srv, llm, 2.0)
        got = []
        threads = [threading.Thread(target=lambda: got.append(srv.request(
            "POST", "/v1/completions", {"prompt": "a", "max_tokens": 1}, headers={}))) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join(60)
        holder.join(60)
        assert sorted(status for status, _, _ in got) == [200, 200, 503, 503]
        deadline = time.time() + 10
        while srv.server._waiting and time.time() < deadline:
            time.sleep(0.01)
        assert srv.server._waiting == 0
    finally:
        srv.stop()


@needs_model
def test_real_openai_fields_work(real):
    """max_completion_tokens, logit_bias, presence/frequency penalties and response_format json_object /
    json_schema are applied (they used to be dropped silently)."""
    srv, llm = real
    base = {"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0}
    status, out = srv.json("POST", "/v1/chat/completions", {**base, "max_completion_tokens": 3})
    assert status == 200 and out["usage"]["completion_tokens"] <= 3
    # a bias of +100 on one token makes it the only choice
    forced = llm.tokenize(" zebra", add_bos=False)[0]
    status, out = srv.json("POST", "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0,
                                                       "logit_bias": {str(forced): 100}})
    assert status == 200 and llm.tokenize(out["choices"][0]["text"], add_bos=False)[:1] == [forced]
    status, out = srv.json("POST", "/v1/chat/completions", {**base, "max_tokens": 8, "presence_penalty": 1.5,
                                                            "frequency_penalty": 1.0})
    assert status == 200
    status, out = srv.json("POST", "/v1/chat/completions", {
        **base, "max_tokens": 48, "response_format": {"type": "json_schema", "json_schema": {"schema": {
            "type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}},
            "required": ["colour"]}}}})
    assert status == 200, out
    reply = json.loads(out["choices"][0]["message"]["content"])
    assert isinstance(reply, dict) and isinstance(reply["colour"], str)
    assert_error(*srv.json("POST", "/v1/chat/completions", {**base, "response_format": {"type": "yaml"}}), 400)
    assert_error(*srv.json("POST", "/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}), 400)
    assert_error(*srv.json("POST", "/v1/completions", {"prompt": "a", "logit_bias": {"99999999": 1}}), 400)


@needs_model
def test_real_model_by_id_and_tokenize(real):
    srv, llm = real
    name = Path(DEFAULT_MODEL).name
    status, out = srv.json("GET", f"/v1/models/{name}")
    assert status == 200 and out["id"] == name
    assert_error(*srv.json("GET", "/v1/models/other.gguf"), 404)
    status, out = srv.json("POST", "/tokenize", {"content": "Hello world"})
    assert status == 200 and out["tokens"] == llm.tokenize("Hello world", add_bos=False)
    status, back = srv.json("POST", "/detokenize", {"tokens": out["tokens"]})
    assert status == 200 and back["content"] == "Hello world"
    assert_error(*srv.json("POST", "/detokenize", {"tokens": [10 ** 9]}), 400)


def test_fake_unknown_fields_are_refused_by_name(fake):
    """Nothing a client relies on is dropped silently (issue 15): an unsupported field is a 400 naming it."""
    srv, llm = fake
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    for field, value in (("tools", [{"type": "function"}]), ("stream_options", {"include_usage": True}),
                         ("top_logprobs", 2), ("functions", []), ("made_up", 1)):
        status, body = srv.json("POST", "/v1/chat/completions", {**chat, field: value})
        assert_error(status, body, 400)
        assert body["error"]["param"] == field and field in body["error"]["message"]
    status, body = srv.json("POST", "/v1/completions", {"prompt": "a", "best_of": 2})
    assert_error(status, body, 400)
    assert body["error"]["param"] == "best_of"
    # model and user are accepted (one model is served; nothing is accounted per user)
    assert srv.json("POST", "/v1/chat/completions", {**chat, "model": "x", "user": "u"})[0] == 200


def _headers(raw: bytes) -> tuple:
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    return int(head[0].split(" ")[1]), {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}


def test_fake_cors_preflight_and_origins():
    """CORS: origins are allowed only when configured; a preflight needs no API key; others get no grant."""
    llm = FakeLLM()
    srv = Running(llm, api_key="k", cors_origins=["http://app.local"])
    try:
        pre = ("OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: {}\r\n"
               "Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, "
               "content-type, x-stainless-os\r\n\r\n")
        status, h = _headers(_raw(srv, pre.format("http://app.local").encode()))
        assert status == 204 and h["access-control-allow-origin"] == "http://app.local"
        assert "POST" in h["access-control-allow-methods"] and "x-stainless-os" in h["access-control-allow-headers"]
        status, h = _headers(_raw(srv, pre.format("http://evil.local").encode()))
        assert status == 403 and "access-control-allow-origin" not in h
        # without an Origin: a plain OPTIONS, answered with Allow
        status, h = _headers(_raw(srv, b"OPTIONS /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == 204 and h["allow"] == "GET, OPTIONS"
        status, h = _headers(_raw(srv, b"OPTIONS /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert status == 404
        # the actual request carries the grant for the allowed origin only (errors too, so a page can read them)
        for origin, granted in (("http://app.local", True), ("http://evil.local", False)):
            req = (f"GET /v1/models HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nAuthorization: Bearer k\r\n"
                   "Connection: close\r\n\r\n")
            status, h = _headers(_raw(srv, req.encode()))
            assert status == 200 and ("access-control-allow-origin" in h) == granted
            status, h = _headers(_raw(srv, req.replace("Bearer k", "Bearer no").encode()))
            assert status == 401 and ("access-control-allow-origin" in h) == granted
    finally:
        srv.stop()
    # "*" grants any origin; no configuration grants none
    for origins, granted in ((["*"], "*"), ([], None)):
        srv = Running(FakeLLM(), cors_origins=origins)
        try:
            req = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nOrigin: http://a.b\r\nConnection: close\r\n\r\n"
            status, h = _headers(_raw(srv, req))
            assert status == 200 and h.get("access-control-allow-origin") == granted
        finally:
            srv.stop()


class BarrierLLM(FakeLLM):
    """A fake whose completions wait until `parties` of them run at once (a serialising server never gets there)."""

    def __init__(self, barrier):
        super().__init__()
        self.barrier = barrier

    def create_completion(self, prompt, **kw):
        self.barrier.wait(timeout=30)  # BrokenBarrierError (a 500) unless the requests overlap
        return super().create_completion(prompt, **kw)


def test_fake_slots_serve_requests_at_once_and_queue_the_rest():
    barrier = threading.Barrier(3)
    fakes = [BarrierLLM(barrier) for _ in range(3)]
    srv = Running(SlotPool(fakes))
    try:
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(
            srv.json("POST", "/v1/completions", {"prompt": f"p{i}", "max_tokens": 2})[0])) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [200, 200, 200]
        assert sorted(len(f.calls) for f in fakes) == [1, 1, 1]  # one request per slot
        assert wait_unlocked(srv)
        assert srv.json("GET", "/health")[1] == {"status": "ok", "slots_idle": 3, "slots_processing": 0}
    finally:
        srv.stop()
    # a fourth request waits for a free slot, then runs (the barrier of three is not waited on again)
    slow = [FakeLLM(delay=0.05)]
    srv = Running(SlotPool(slow))
    try:
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(
            srv.json("POST", "/v1/completions", {"prompt": f"p{i}", "max_tokens": 3})[0])) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [200] * 4 and len(slow[0].calls) == 4
    finally:
        srv.stop()


@needs_model
def test_real_slots_keep_each_conversation_in_its_own_slot():
    """Two conversations interleaved over two slots: each continuation goes to the slot holding its prefix and
    evaluates only the new messages; the answers equal those of a server with one conversation."""
    pool = open_sessions(DEFAULT_MODEL, 2, n_local=256, n_threads=1, n_gpu_layers=N_GPU_LAYERS)
    srv = Running(pool)
    try:
        convs = {k: [{"role": "user", "content": q}] for k, q in (("a", "Name a fruit."), ("b", "Name a city."))}
        first = {}
        for k, msgs in convs.items():
            status, out = srv.json("POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 6,
                                                                      "temperature": 0})
            assert status == 200, out
            first[k] = out["usage"]["prompt_tokens"]
            msgs.append(out["choices"][0]["message"])
            msgs.append({"role": "user", "content": "And another?"})
        for k, msgs in convs.items():
            status, out = srv.json("POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 6,
                                                                      "temperature": 0})
            assert status == 200, out
            # only the reply's end and the new user turn are evaluated (a fresh start would cost > first[k])
            assert out["usage"]["prompt_tokens"] < first[k], (k, out["usage"], first)
        held = [bytes(s.seq.text or b"") for s in pool.sessions]
        assert any(b"fruit" in h for h in held) and any(b"city" in h for h in held)
    finally:
        srv.stop()
        pool.close()
