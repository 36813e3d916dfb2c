"""llama-server's own API on `lminf serve` (llama_api.py): POST /completion and its stream, the extension fields on
the OpenAI routes, /props, /slots and slot save/restore/erase, /metrics, /tokenize with_pieces, and replies cut
inside a multi-byte character. On the offline default model, two slots with a 256-token window."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import N_GPU_LAYERS, needs_default_model
from test_server import Running, assert_error, wait_unlocked

from lminf_gguf.slots import open_sessions

pytestmark = needs_default_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("slots")
    pool = open_sessions(None, 2, n_local=256, n_threads=1, n_gpu_layers=N_GPU_LAYERS)
    running = Running(pool, slot_save_path=str(save_dir), metrics=True)
    running.save_dir = save_dir
    yield running
    running.stop()
    pool.close()


def settle(srv):
    """A slot is released (and its figures counted) just after its response is sent: wait for that."""
    assert wait_unlocked(srv)


def post(srv, path, body):
    return srv.json("POST", path, body)


def completion(srv, **body):
    status, out = post(srv, "/completion", {"prompt": PROMPT, "temperature": 0, **body})
    assert status == 200, out
    return out


def llama_stream(srv, body):
    """The data: payloads of a llama-server-shaped stream (no [DONE] at its end)."""
    status, ctype, text = srv.request("POST", "/completion", {"prompt": PROMPT, "temperature": 0, "stream": True,
                                                             **body})
    assert status == 200 and ctype.startswith("text/event-stream"), text
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[len("data: "):]) for e in events]


# -- POST /completion ---------------------------------------------------------------------------------------------

def test_completion_shape_limit_and_word(srv):
    out = completion(srv, n_predict=4)
    assert {"content", "tokens_predicted", "tokens_evaluated", "stop", "stop_type", "stopping_word", "truncated",
            "generation_settings", "model", "prompt", "timings", "id_slot"} <= set(out)
    assert out["stop"] is True and out["stop_type"] == "limit" and out["stopping_word"] == ""
    assert out["tokens_predicted"] == 4 and out["tokens_evaluated"] == 5 and out["prompt"] == PROMPT
    assert out["truncated"] is False and out["id_slot"] in (0, 1) and out["content"]
    assert out["generation_settings"]["n_predict"] == 4 and out["generation_settings"]["temperature"] == 0
    t = out["timings"]
    assert t["prompt_n"] == 5 and t["predicted_n"] == 4 and t["predicted_ms"] > 0 and t["prompt_per_second"] > 0
    word = completion(srv, n_predict=8, stop=[" Paris", "zzz"])  # greedy: " Paris" comes first
    assert word["stop_type"] == "word" and word["stopping_word"] == " Paris" and word["content"] == ""


def test_completion_eos_grammar_and_json_schema(srv):
    out = completion(srv, n_predict=8, grammar='root ::= "yes" | "no"')
    assert out["content"] in ("yes", "no") and out["stop_type"] == "eos"  # the grammar complete: only EOS is left
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    out = completion(srv, prompt='JSON with a number: {"a": 7}\nAnother one:', n_predict=24, json_schema=schema)
    assert out["stop_type"] == "eos", out
    assert isinstance(json.loads(out["content"])["a"], int)


def test_completion_stream_shape(srv):
    whole = completion(srv, n_predict=5)
    chunks = llama_stream(srv, {"n_predict": 5})
    *pieces, last = chunks
    assert pieces and all(c["stop"] is False and c["content"] and c["id_slot"] in (0, 1) for c in pieces)
    assert "".join(c["content"] for c in pieces) == whole["content"]
    assert last["stop"] is True and last["content"] == "" and last["stop_type"] == "limit"
    assert last["tokens_predicted"] == 5 and last["timings"]["predicted_n"] == 5 and "generation_settings" in last


def test_n_probs_shape(srv):
    out = completion(srv, n_predict=2, n_probs=3)
    probs = out["completion_probabilities"]
    assert len(probs) == 2
    for p in probs:
        assert p["logprob"] <= 0 and isinstance(p["token"], str) and isinstance(p["bytes"], list)
        assert len(p["top_logprobs"]) == 3 and all({"token", "bytes", "logprob"} <= set(t) for t in p["top_logprobs"])
        assert p["top_logprobs"][0]["logprob"] >= p["top_logprobs"][-1]["logprob"]
    streamed = llama_stream(srv, {"n_predict": 2, "n_probs": 2})
    got = [p for c in streamed[:-1] for p in c["completion_probabilities"]]
    assert len(got) == 2 and all(len(p["top_logprobs"]) == 2 for p in got)


def test_ignore_eos_runs_to_n_predict(srv):
    chat = {"messages": [{"role": "user", "content": "Is the sky blue? Answer yes or no."}], "temperature": 0,
            "n_predict": 24}
    status, free = post(srv, "/v1/chat/completions", chat)
    assert status == 200 and free["usage"]["completion_tokens"] < 24, free  # the model ends its turn itself
    status, out = post(srv, "/v1/chat/completions", dict(chat, ignore_eos=True))
    assert status == 200 and out["usage"]["completion_tokens"] == 24 and out["choices"][0]["finish_reason"] == "length"
    assert completion(srv, prompt="The end.", n_predict=24)["stop_type"] == "eos"
    out = completion(srv, prompt="The end.", n_predict=24, ignore_eos=True)
    assert out["tokens_predicted"] == 24 and out["stop_type"] == "limit" and out["generation_settings"]["ignore_eos"]


def test_id_slot(srv):
    for slot in (1, 0, 1):
        assert completion(srv, n_predict=1, id_slot=slot)["id_slot"] == slot
    assert completion(srv, n_predict=1, id_slot=-1)["id_slot"] in (0, 1)
    assert_error(*post(srv, "/completion", {"prompt": "a", "id_slot": 2}), 400)
    status, out = post(srv, "/v1/completions", {"prompt": "a", "max_tokens": 1, "id_slot": 1})
    assert status == 200, out
    settle(srv)
    # that request's prompt and its token
    assert srv.json("GET", "/slots")[1][1]["lminf"]["n_tokens"] == out["usage"]["total_tokens"]


@pytest.mark.parametrize("body, param, words", [
    ({"dry_multiplier": 0.5}, "dry_multiplier", "unsupported field"),
    ({"n_keep": 5}, "n_keep", "n_global"),
    ({"n_keep": -1}, "n_keep", "sinks"),
    ({"n_predict": 0}, "n_predict", "n_predict"),
    ({"samplers": ["temperature", "top_k"]}, "samplers", "order"),
    ({"samplers": "kt"}, "samplers", "string form"),
    ({"samplers": ["top_k", "mirostat"]}, "samplers", "mirostat"),
    ({"samplers": ["top_k", "temperature"], "top_p": 0.5}, "samplers", "top_p"),
    ({"grammar": 'root ::= "a"', "json_schema": {"type": "object"}}, "json_schema", "give one"),
    ({"grammar": "root ::= ("}, "grammar", "grammar"),
    ({"json_schema": {"type": "string", "minLength": 10 ** 6}}, "json_schema", "minLength"),
    ({"typical_p": 2}, "typical_p", "typical_p"),
    ({"cache_prompt": "yes"}, "cache_prompt", "boolean"),
    ({"prompt": ["a", "b"]}, "prompt", "one prompt"),
    ({"echo": True}, "echo", "unsupported field"),
])
def test_completion_refusals_by_name(srv, body, param, words):
    status, out = post(srv, "/completion", {"prompt": "Hi", "n_predict": 1, **body})
    assert_error(status, out, 400)
    assert out["error"]["param"] == param or param in out["error"]["message"], out
    assert words in out["error"]["message"], out


def test_extension_fields_on_openai_routes(srv):
    chat = {"messages": [{"role": "user", "content": "Give me a JSON object."}], "temperature": 0.5, "seed": 1}
    status, out = post(srv, "/v1/chat/completions", dict(
        chat, n_predict=3, cache_prompt=True, id_slot=1, typical_p=0.9, n_keep=0,
        samplers=["penalties", "top_k", "typ_p", "top_p", "min_p", "temperature"]))
    assert status == 200 and out["usage"]["completion_tokens"] <= 3, out
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    status, out = post(srv, "/v1/chat/completions", dict(chat, temperature=0, max_tokens=24, json_schema=schema))
    assert status == 200 and isinstance(json.loads(out["choices"][0]["message"]["content"])["ok"], bool), out
    status, out = post(srv, "/v1/chat/completions", dict(chat, n_predict=2, n_probs=2))
    assert status == 200 and all(len(t["top_logprobs"]) == 2 for t in out["choices"][0]["logprobs"]["content"])
    status, out = post(srv, "/v1/completions", {"prompt": PROMPT, "n_predict": 2, "n_probs": 2, "temperature": 0,
                                                "grammar": 'root ::= " Paris" | " Lyon"'})
    assert status == 200 and out["choices"][0]["text"] in (" Paris", " Lyon")
    assert all(len(t) == 2 for t in out["choices"][0]["logprobs"]["top_logprobs"])
    status, out = post(srv, "/v1/chat/completions", dict(chat, grammar='root ::= "a"',
                                                         response_format={"type": "json_object"}))
    assert_error(status, out, 400)
    status, out = post(srv, "/v1/completions", {"prompt": "a", "n_predict": 2, "max_tokens": 3})
    assert_error(status, out, 400)


# -- /props, /slots, slot files -----------------------------------------------------------------------------------

def test_props(srv):
    status, props = srv.json("GET", "/props")
    assert status == 200
    assert props["total_slots"] == 2 and props["modalities"]["vision"] is False
    assert props["default_generation_settings"]["n_ctx"] == 256
    assert props["default_generation_settings"]["params"]["n_predict"] == -1
    assert props["model_path"].endswith(".gguf") and props["chat_template"] and "lminf_gguf" in props["build_info"]
    assert props["lminf"]["mode"] == "lminf" and props["lminf"]["n_local"] == 256 and props["lminf"]["n_global"] > 0


def test_slots_list(srv):
    completion(srv, n_predict=1, id_slot=0)
    settle(srv)
    status, slots = srv.json("GET", "/slots")
    assert status == 200 and [s["id"] for s in slots] == [0, 1]
    assert all(s["is_processing"] is False and s["n_ctx"] == 256 for s in slots)
    assert slots[0]["lminf"]["n_tokens"] == 6 and slots[0]["lminf"]["cells_used"] > 0


def _chat_turn(srv, messages):
    status, out = post(srv, "/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 4,
                                                     "id_slot": 1})
    assert status == 200, out
    return out["choices"][0]["message"]["content"], out["usage"]["prompt_tokens"]


def test_slot_save_restore_erase(srv):
    d = srv.save_dir
    messages = [{"role": "user", "content": "Name a colour."}]
    reply, fresh = _chat_turn(srv, messages)
    status, saved = post(srv, "/slots/1?action=save", {"filename": "conv.bin"})
    assert status == 200 and saved["id_slot"] == 1 and saved["filename"] == "conv.bin" and saved["n_saved"] > 0
    assert (d / "conv.bin").is_file() and "save_ms" in saved["timings"]
    status, erased = post(srv, "/slots/1?action=erase", None)
    assert status == 200 and erased == {"id_slot": 1, "n_erased": saved["n_saved"]}
    status, restored = post(srv, "/slots/1?action=restore", {"filename": "conv.bin"})
    assert status == 200 and restored["n_restored"] == saved["n_saved"] and "restore_ms" in restored["timings"]
    # the restored conversation is continued: only the new turn is evaluated
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Another."}]
    reply, reused = _chat_turn(srv, messages)
    assert reused < fresh, (reused, fresh)
    messages.append({"role": "assistant", "content": reply})

    # a corrupt file is refused and the slot keeps its conversation
    data = bytearray((d / "conv.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "bad.bin").write_bytes(bytes(data))
    status, out = post(srv, "/slots/1?action=restore", {"filename": "bad.bin"})
    assert_error(status, out, 400)
    assert "checksum" in out["error"]["message"]
    status, out = post(srv, "/slots/1?action=restore", {"filename": "missing.bin"})
    assert_error(status, out, 400)
    messages.append({"role": "user", "content": "And one more."})
    _, reused = _chat_turn(srv, messages)  # the conversation the slot held before the refused file goes on
    assert reused < fresh, (reused, fresh)


@pytest.mark.parametrize("name", ["../escape.bin", "/tmp/abs.bin", "a/b.bin", "a\\b.bin", "..", ".", "",
                                  "nul\x00.bin", "x" * 300, " lead.bin", "line\n.bin", 7])
def test_slot_filenames_confined(srv, name):
    before = set(os.listdir(srv.save_dir.parent))
    status, out = post(srv, "/slots/0?action=save", {"filename": name})
    assert_error(status, out, 400)
    assert out["error"]["param"] == "filename"
    assert set(os.listdir(srv.save_dir.parent)) == before and not Path("/tmp/abs.bin").exists()


def test_slot_action_errors(srv):
    assert_error(*post(srv, "/slots/0?action=explode", {"filename": "a"}), 400)
    assert_error(*post(srv, "/slots/0", {"filename": "a"}), 400)
    assert_error(*post(srv, "/slots/9?action=save", {"filename": "a"}), 400)
    assert_error(*post(srv, "/slots/x?action=save", {"filename": "a"}), 400)
    assert_error(*post(srv, "/slots/0?action=save", {"filename": "a", "extra": 1}), 400)
    assert_error(*srv.json("GET", "/slots/0"), 404)


def test_slot_action_waits_for_a_busy_slot(srv):
    import socket
    import threading
    sock = socket.create_connection((srv.host, srv.port), timeout=60)
    body = json.dumps({"prompt": PROMPT, "n_predict": 200, "ignore_eos": True, "stream": True, "id_slot": 0,
                       "temperature": 0}).encode()
    sock.sendall(b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while b"data: " not in got:
        got += sock.recv(4096)
    result = {}
    saver = threading.Thread(target=lambda: result.update(
        out=post(srv, "/slots/0?action=save", {"filename": "busy.bin"})))
    try:
        saver.start()
        saver.join(0.5)
        assert saver.is_alive() and srv.json("GET", "/slots")[1][0]["is_processing"] is True
    finally:
        sock.close()  # the stream's client leaves: its generation stops and the save takes the slot
    saver.join(60)
    status, out = result["out"]
    assert status == 200 and out["n_saved"] > 6 and (srv.save_dir / "busy.bin").is_file(), out


def test_without_flags_501(srv):
    plain = Running(srv.server.pool)
    try:
        status, out = plain.json("POST", "/slots/0?action=save", {"filename": "a"})
        assert_error(status, out, 501)
        assert "--slot-save-path" in out["error"]["message"]
        status, out = plain.json("GET", "/metrics")
        assert_error(status, out, 501)
        assert "--metrics" in out["error"]["message"]
    finally:
        plain.stop()


# -- /metrics -----------------------------------------------------------------------------------------------------

def _metrics(srv) -> dict:
    status, ctype, text = srv.request("GET", "/metrics")
    assert status == 200 and ctype == "text/plain; version=0.0.4"
    values, types = {}, {}
    for line in text.splitlines():  # the Prometheus text format: # HELP, # TYPE, then "name value"
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*) (\S+)", line)
            assert m, line
            values[m.group(1)] = float(m.group(2))
    assert set(values) == set(types)
    return values


def test_metrics_counters_move(srv):
    settle(srv)
    before = _metrics(srv)
    for name in ("llamacpp:prompt_tokens_total", "llamacpp:tokens_predicted_total", "llamacpp:requests_processing",
                 "llamacpp:requests_deferred", "llamacpp:n_decode_total", "llamacpp:kv_cache_tokens",
                 "lminf:rebases_total"):
        assert name in before
    out = completion(srv, n_predict=3)
    settle(srv)
    after = _metrics(srv)
    assert after["llamacpp:prompt_tokens_total"] - before["llamacpp:prompt_tokens_total"] == out["tokens_evaluated"]
    assert after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"] == 3
    assert after["llamacpp:n_decode_total"] - before["llamacpp:n_decode_total"] == 1 + 3  # a prompt batch, 3 tokens
    assert after["lminf:requests_total"] == before["lminf:requests_total"] + 1
    assert after["llamacpp:requests_processing"] == 0 and after["llamacpp:kv_cache_tokens"] > 0
    # a long stream moves the window: rebases are counted
    assert post(srv, "/completion", {"prompt": "word " * 1600, "n_predict": 1, "id_slot": 1})[0] == 200
    settle(srv)
    assert _metrics(srv)["lminf:rebases_total"] > after["lminf:rebases_total"]


# -- /tokenize, and replies cut inside a character ---------------------------------------------------------------

def test_tokenize_pieces_and_fields(srv):
    status, out = post(srv, "/tokenize", {"content": "Hello world", "with_pieces": True})
    assert status == 200 and "".join(t["piece"] for t in out["tokens"]) == "Hello world"
    assert all(isinstance(t["id"], int) for t in out["tokens"])
    status, out = post(srv, "/tokenize", {"content": "😀", "with_pieces": True})
    assert status == 200 and bytes(b for t in out["tokens"] for b in (
        t["piece"] if isinstance(t["piece"], list) else t["piece"].encode())) == "😀".encode()
    assert len(post(srv, "/tokenize", {"content": "<|im_end|>", "parse_special": True})[1]["tokens"]) == 1
    assert len(post(srv, "/tokenize", {"content": "<|im_end|>"})[1]["tokens"]) > 1
    status, out = post(srv, "/tokenize", {"content": "a", "with_peices": True})
    assert_error(status, out, 400)
    assert out["error"]["param"] == "with_peices"
    assert_error(*post(srv, "/detokenize", {"tokens": [1], "with_pieces": True}), 400)


def test_no_replacement_char_when_cut_inside_a_character(srv):
    cut = 0
    for n in (1, 2, 3, 4):
        body = {"prompt": "😀😃😄", "temperature": 0, "max_tokens": n}
        status, out = post(srv, "/v1/completions", body)
        text = out["choices"][0]["text"]
        assert status == 200 and not text.endswith("\ufffd"), (n, text)
        cut += out["usage"]["completion_tokens"] > 0 and text == ""  # a token that is part of a character
        streamed = "".join(c["choices"][0]["text"] for c in srv.sse("/v1/completions", dict(body, stream=True)))
        assert streamed == text
        out = completion(srv, prompt="😀😃😄", n_predict=n)
        assert not out["content"].endswith("\ufffd") and out["content"] == text
        chat = srv.sse("/v1/chat/completions", {"messages": [{"role": "user", "content": "Reply with emoji: 😀"}],
                                                 "temperature": 0, "max_tokens": n, "stream": True})
        assert "\ufffd" not in "".join(c["choices"][0]["delta"].get("content") or "" for c in chat)
    assert cut, "no reply was cut inside a character: the test does not test anything"


# -- the flags, in a child process ---------------------------------------------------------------------------------

def test_serve_flags_child_process(tmp_path):
    # the package this suite imports (installed, or PYTHONPATH's checkout); cwd elsewhere than the checkout, whose
    # lminf_gguf/ has no library unless it is on PYTHONPATH
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "lminf_gguf.cli", "serve", "--port", "0", "--n-local", "256",
                             "--threads", "1", "--slot-save-path", str(tmp_path), "--metrics", "--quiet",
                             "--no-webui"], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        line = ""
        deadline = time.time() + 120
        while "serving" not in line and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited"
        host, port = re.search(r"http://([\d.]+):(\d+)", line).groups()
        srv = Running.__new__(Running)
        srv.host, srv.port = host, int(port)
        out = completion(srv, n_predict=2)
        assert out["tokens_predicted"] == 2
        status, _ = srv.json("POST", "/slots/0?action=save", {"filename": "s.bin"})
        assert status == 200 and (tmp_path / "s.bin").is_file()
        assert _metrics(srv)["llamacpp:tokens_predicted_total"] == 2
    finally:
        proc.terminate()
        proc.wait(30)
    bad = subprocess.run([sys.executable, "-m", "lminf_gguf.cli", "serve", "--slot-save-path",
                          str(tmp_path / "absent")], capture_output=True, text=True, env=env, timeout=120,
                         cwd=tmp_path)
    assert bad.returncode != 0 and "--slot-save-path" in bad.stderr
