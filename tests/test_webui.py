"""The chat page at GET / (lminf_gguf/webui.html): served with its headers (off with webui=False / --no-webui),
self-contained (nothing loaded from the network), and driven in a real headless Chromium over the DevTools
protocol: the page loads, a message typed into it is sent with Enter, and the reply of the real default model
streams into the DOM, with no console error; an attached file is read with the prompt's progress shown
(return_progress, also checked on the server with the real model); conversations are kept, switched and deleted;
markdown is built as DOM nodes. Screenshots are left in the test's tmp_path (webui.png, webui-progress.png) and
copied to $LMINF_TEST_ARTIFACTS when it is set (for CI to keep).

The browser tests skip when no Chromium is found (Debian: apt-get install chromium); the others always run."""

from __future__ import annotations

import argparse
import base64
import fcntl
import http.client
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import N_GPU_LAYERS, needs_default_model
from test_server import FakeLLM, Running

import lminf_gguf
from lminf_gguf import webui
from lminf_gguf.httpio import MAX_BODY_BYTES
from lminf_gguf.server import add_parser

HTML = Path(lminf_gguf.__file__).with_name("webui.html")


def _get(srv, path, method="GET", headers=None):
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), body


class PageFake(FakeLLM):
    """FakeLLM with what the page asks for: return_progress (`batches` prompt_progress chunks, batch_delay seconds
    apart, before the reply; a cancel stops them) and, optionally, a reply text of its own streamed in 7-character
    pieces (reply: markdown) instead of "w0 w1 ..."."""

    def __init__(self, delay=0.0, reply=None, batches=4, batch_delay=0.0):
        super().__init__(delay)
        self.reply, self.batches, self.batch_delay = reply, batches, batch_delay
        self.progress_stopped = 0  # progress streams ended before the prompt was "read" (Stop, a disconnect)

    def create_chat_completion(self, messages, return_progress=False, **kw):
        inner = super().create_chat_completion(messages, **kw)
        self.calls[-1]["return_progress"] = return_progress
        if not kw.get("stream"):
            return inner
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": self.model_path}
        total = sum(len(m["content"]) for m in messages) // 4 + 1

        def chunks():
            if return_progress:
                try:
                    for i in range(1, self.batches + 1):
                        deadline = time.monotonic() + self.batch_delay
                        while time.monotonic() < deadline and not self.cancelled.is_set():
                            time.sleep(0.005)
                        if self.cancelled.is_set():
                            self.progress_stopped += 1
                            return
                        yield dict(base, choices=[], prompt_progress={
                            "total": total, "cache": 0, "processed": total * i // self.batches,
                            "time_ms": int(1000 * self.batch_delay * i)})
                except GeneratorExit:
                    self.progress_stopped += 1
                    raise
            if self.reply is None:
                yield from inner
                return
            yield dict(base, choices=[{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])
            for k in range(0, len(self.reply), 7):
                yield dict(base, choices=[{"index": 0, "delta": {"content": self.reply[k:k + 7]},
                                           "finish_reason": None}])
            yield dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])
        return chunks()


@pytest.fixture
def fake_srv():
    srv = Running(FakeLLM())
    yield srv
    srv.stop()


# -- (a) served, with its headers; off with webui=False --------------------------------------------------------------

def test_page_is_served_with_its_headers(fake_srv):
    for path in ("/", "/index.html", "/?x=1"):
        status, headers, body = _get(fake_srv, path)
        assert status == 200, body
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert headers["Cache-Control"] == "no-cache"
        assert headers["X-Content-Type-Options"] == "nosniff"
        csp = {d.split()[0]: d.split()[1:] for d in headers["Content-Security-Policy"].split("; ")}
        assert csp["default-src"] == ["'self'"] and csp["connect-src"] == ["'self'"]
        assert csp["script-src"] == ["'unsafe-inline'"] and csp["style-src"] == ["'unsafe-inline'"]
        assert int(headers["Content-Length"]) == len(body)
        assert body == HTML.read_bytes() and body.startswith(b"<!doctype html>")
    # the page's own JSON, with the API's shape
    status, _, body = _get(fake_srv, "/webui/info")
    info = json.loads(body)
    assert status == 200 and info["model"] == "fake.gguf" and info["slots"] == 1
    assert info["api_key_required"] is False
    assert info["max_body_bytes"] == MAX_BODY_BYTES  # the page states it and checks attached files against it


def test_max_body_bytes_follows_the_memory_budget():
    # a parsed body holds parsed_body_cost x its bytes of the budget: a small --memory-budget-mb takes less
    srv = Running(FakeLLM(), memory_budget=1 << 20)
    try:
        info = json.loads(_get(srv, "/webui/info")[2])
        assert info["max_body_bytes"] == (1 << 20) // srv.server.parsed_body_cost
    finally:
        srv.stop()


def test_return_progress_is_checked():
    """return_progress (llama-server's field) is a chat field, streamed only: a 400 that names it otherwise; given
    with stream it reaches the engine."""
    llm = PageFake()
    srv = Running(llm)
    try:
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for body, why in ((dict(chat, return_progress=True), "stream"),
                          (dict(chat, return_progress=True, stream=False), "stream"),
                          (dict(chat, return_progress="yes", stream=True), "boolean")):
            status, out = srv.json("POST", "/v1/chat/completions", body)
            assert status == 400 and out["error"]["param"] == "return_progress", out
            assert why in out["error"]["message"], out
        status, out = srv.json("POST", "/v1/completions", {"prompt": "x", "return_progress": True, "stream": True})
        assert status == 400 and out["error"]["param"] == "return_progress", out  # chat only
        status, out = srv.json("POST", "/v1/chat/completions", dict(chat, return_progress=False))
        assert status == 200 and llm.calls[-1]["return_progress"] is False
        chunks = srv.sse("/v1/chat/completions", dict(chat, return_progress=True, stream=True))
        assert llm.calls[-1]["return_progress"] is True
        assert [c["prompt_progress"]["processed"] for c in chunks if "prompt_progress" in c] == [0, 0, 0, 1]
    finally:
        srv.stop()


def _progress_and_content(chunks):
    """(prompt_progress dicts, index of the first chunk with choices) of a streamed chat, shapes checked."""
    progress = []
    first = None
    for i, c in enumerate(chunks):
        if "prompt_progress" in c:
            assert first is None, "a progress chunk after the reply began"
            assert c["choices"] == [] and c["object"] == "chat.completion.chunk"
            assert {"id", "created", "model"} <= set(c)
            assert set(c["prompt_progress"]) == {"total", "cache", "processed", "time_ms"}
            progress.append(c["prompt_progress"])
        elif first is None:
            first = i
    return progress, first


@needs_default_model
def test_return_progress_with_the_real_model():
    """POST /v1/chat/completions with stream and return_progress: a prompt_progress chunk after each prompt batch,
    before any content, processed increasing to total; the next turn of the conversation is read from the held
    prefix (cache), and a request without the field has no progress chunk."""
    llm = lminf_gguf.LMInfinite(n_local=128, n_batch=16, n_threads=2, n_gpu_layers=N_GPU_LAYERS)
    srv = Running(llm)
    try:
        question = "Read this list of fruit: " + ", ".join(["apple", "pear", "plum", "fig"] * 8) + ". Which?"
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 4, "temperature": 0,
                "stream": True, "return_progress": True}
        chunks = srv.sse("/v1/chat/completions", body)
        progress, first = _progress_and_content(chunks)
        assert len(progress) >= 2, progress
        done = [p["processed"] for p in progress]
        assert done == sorted(set(done)) and done[-1] == progress[-1]["total"], progress
        assert {p["total"] for p in progress} == {progress[0]["total"]} and progress[0]["cache"] == 0
        assert done[0] == 16 and progress[0]["total"] > 32  # one chunk per batch of n_batch tokens
        assert [p["time_ms"] for p in progress] == sorted(p["time_ms"] for p in progress)
        assert first is not None and chunks[first]["choices"][0]["delta"] == {"role": "assistant"}
        reply = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[first:] if c["choices"])
        assert reply, chunks
        total = progress[-1]["total"]

        # the next turn: the slot holds the conversation, only the new message is read
        body["messages"] += [{"role": "assistant", "content": reply},
                             {"role": "user", "content": "And which fruit comes after the pear in the list?"}]
        progress, first = _progress_and_content(srv.sse("/v1/chat/completions", body))
        assert progress and progress[0]["cache"] >= total, progress
        assert progress[-1]["processed"] == progress[-1]["total"] > progress[0]["cache"]

        body.pop("return_progress")
        progress, first = _progress_and_content(srv.sse("/v1/chat/completions", body))
        assert progress == [] and first == 0
    finally:
        srv.stop()
        llm.close()


def test_page_needs_no_api_key_but_the_api_does():
    srv = Running(FakeLLM(), api_key="sekrit")
    try:
        assert _get(srv, "/")[0] == 200  # a browser opening the address cannot send a key: the page asks for it
        for path in ("/webui/info", "/v1/models"):
            assert _get(srv, path)[0] == 401
        status, _, body = _get(srv, "/webui/info", headers={"Authorization": "Bearer sekrit"})
        assert status == 200 and json.loads(body)["api_key_required"] is True
    finally:
        srv.stop()


def test_no_webui_is_a_404():
    srv = Running(FakeLLM(), webui=False)
    try:
        for path in ("/", "/index.html", "/webui/info"):
            status, headers, body = _get(srv, path)
            assert status == 404 and headers["Content-Type"] == "application/json", body
            assert json.loads(body)["error"]["code"] == "not_found"
        assert _get(srv, "/v1/models")[0] == 200
    finally:
        srv.stop()
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert parser.parse_args(["serve", "--no-webui"]).no_webui is True
    assert parser.parse_args(["serve"]).no_webui is False


def test_head_and_other_methods_as_on_the_other_get_routes(fake_srv):
    # HEAD is answered as on every GET route of this server (405, Allow: GET); POST / likewise
    for method in ("HEAD", "POST"):
        status, headers, _ = _get(fake_srv, "/", method=method)
        assert status == 405 and headers["Allow"] == "GET"


def test_cors_as_on_the_api():
    srv = Running(FakeLLM(), cors_origins=["http://localhost:3000"])
    try:
        _, headers, _ = _get(srv, "/", headers={"Origin": "http://localhost:3000"})
        assert headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        _, headers, _ = _get(srv, "/", headers={"Origin": "http://evil.example"})
        assert "Access-Control-Allow-Origin" not in headers
    finally:
        srv.stop()


def test_page_is_package_data():
    # read from the installed package (importlib.resources), and copied into the wheel: scikit-build-core's
    # wheel.packages takes every file of lminf_gguf/ that git does not ignore
    assert webui.page() == HTML.read_bytes()
    if shutil.which("git"):  # rc 128 outside a git checkout (an installed package): nothing to check there
        source = Path(__file__).resolve().parents[1] / "lminf_gguf"  # the checkout's file (the installed one sits in
        ignored = subprocess.run(["git", "check-ignore", "-q", HTML.name], cwd=source, capture_output=True)  # .venv)
        assert ignored.returncode != 0, "lminf_gguf/webui.html is git-ignored: it would be left out of the wheel"


# -- (b) self-contained ------------------------------------------------------------------------------------------

def test_page_loads_nothing_from_the_network():
    text = HTML.read_text("utf-8")
    # anything a browser would load: src=, href=, url(, @import, import ... from / import(), fetch of a full URL
    loads = re.findall(r"""(?<=\s)(?:src|srcset|href|action|formaction|poster|data)=["']([^"']*)["']""", text)
    loads += re.findall(r"""url\(\s*["']?([^"')]+)""", text)
    loads += re.findall(r"""@import\s+["']?([^"';]+)""", text)
    loads += re.findall(r"""\bimport\s*(?:\(|[\w{}*,\s]+\bfrom\s)\s*["']([^"']+)""", text)
    loads += re.findall(r"""\bfetch\(\s*["'`]([^"'`]+)""", text)
    assert loads, "the scan finds nothing at all: it is broken"
    external = [u for u in loads if re.match(r"(?i)(https?:|wss?:|ftp:)?//", u)]
    assert not external, external
    assert all(u.startswith(("/", "data:")) for u in loads), loads
    # no absolute or protocol-relative URL anywhere, not even in a string built at run time
    assert not re.search(r"(?i)\b(https?|wss?|ftp):", text)
    assert not re.search(r"""["'`(]\s*//[\w.-]""", text)
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)=\"(?!data:)", text)
    # model output is rendered as text only
    assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text


# -- (c) in a real browser -----------------------------------------------------------------------------------------

def _chromium():
    for name in (os.environ.get("LMINF_TEST_CHROMIUM"), "chromium", "chromium-browser", "google-chrome",
                 "/usr/bin/chromium"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = _chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")


_TRAMPOLINE = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
               "os.close(int(sys.argv[1])); os.close(int(sys.argv[2])); os.execv(sys.argv[3], sys.argv[3:])")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: commands on fd 3,
    replies and events on fd 4, NUL-separated JSON), standard library only. Every wait has a deadline, and
    close() kills the browser, so that a hang fails the test instead of stalling the suite."""

    def __init__(self, timeout=20.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="lminf-chromium-")
        cmd_r, self._cmd_w = os.pipe()   # we write, Chromium reads (its fd 3)
        self._out_r, out_w = os.pipe()   # Chromium writes (its fd 4), we read
        # the ends Chromium gets, above 4, so that moving one to 3 or 4 cannot clobber the other
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for fd in (cmd_r, out_w)]
        os.close(cmd_r)
        os.close(out_w)
        cmd_r, out_w = moved
        args = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--mute-audio", "--window-size=1000,800",
                "about:blank"]
        # a Python trampoline puts the two pipe ends at fds 3 and 4, where Chromium looks for them
        self.proc = subprocess.Popen([sys.executable, "-c", _TRAMPOLINE, str(cmd_r), str(out_w), *args],
                                     pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(cmd_r)
        os.close(out_w)
        self._next = 0
        self._replies = {}
        self._cond = threading.Condition()
        self.events = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr = []
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()

    def _read(self):
        buf = b""
        with os.fdopen(self._out_r, "rb", buffering=0) as f:
            while True:
                data = f.read(1 << 16)
                if not data:
                    break
                buf += data
                *messages, buf = buf.split(b"\0")
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        with self._cond:
                            self._replies[msg["id"]] = msg
                            self._cond.notify_all()
                    else:
                        self.events.put(msg)
        with self._cond:
            self._replies[None] = "closed"
            self._cond.notify_all()

    def send(self, method, params=None, session=None, timeout=None):
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while msg["id"] not in self._replies:
                left = deadline - time.monotonic()
                if None in self._replies or left <= 0:
                    raise AssertionError(f"Chromium did not answer {method} (rc {self.proc.poll()}): "
                                         + b"".join(self._stderr[-20:]).decode(errors="replace")[-2000:])
                self._cond.wait(left)
            reply = self._replies.pop(msg["id"])
        if "error" in reply:
            raise AssertionError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def close(self):
        try:
            os.write(self._cmd_w, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)
        finally:
            os.close(self._cmd_w)
            shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab: its console errors and uncaught exceptions are collected in errors."""

    def __init__(self, browser: Browser):
        self.b = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.errors = []
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")

    def send(self, method, params=None, **kw):
        return self.b.send(method, params, session=self.session, **kw)

    def _drain(self):
        while True:
            try:
                ev = self.b.events.get_nowait()
            except queue.Empty:
                return
            method, p = ev.get("method"), ev.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                self.errors.append(("console." + p["type"], [a.get("value", a.get("description"))
                                                             for a in p.get("args", [])]))
            elif method == "Runtime.exceptionThrown":
                self.errors.append(("exception", p["exceptionDetails"].get("exception", {}).get("description")
                                    or p["exceptionDetails"].get("text")))
            elif method == "Log.entryAdded" and p["entry"].get("level") == "error":
                self.errors.append(("log", p["entry"].get("text"), p["entry"].get("url")))

    def js(self, expression):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression, timeout=20.0, what=None):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                self._drain()
                state = self.js("JSON.stringify({state: document.body.dataset.state, error: "
                                "document.getElementById('error').textContent, messages: [...document."
                                "querySelectorAll('.msg')].map(e => [e.className, e.textContent, e.dataset])})")
                raise AssertionError(f"timed out waiting for {what or expression}; page: {state}; "
                                     f"errors: {self.errors}")
            time.sleep(0.02)

    def open(self, url):
        self.send("Page.navigate", {"url": url})
        self.wait("document.readyState === 'complete' && document.body.dataset.state === 'idle' && "
                  "document.body.dataset.info", what="the page to load")

    def type(self, text):
        self.send("Input.insertText", {"text": text})

    def key(self, key="Enter", shift=False):
        params = {"key": key, "code": key, "windowsVirtualKeyCode": 13, "modifiers": 8 if shift else 0}
        self.send("Input.dispatchKeyEvent", {"type": "keyDown", "text": "\r", **params})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **params})

    def click(self, element_id):
        self.js(f"document.getElementById({json.dumps(element_id)}).click()")

    def set_files(self, element_id, paths):
        """Choose files in an <input type=file> (as the user would in the file dialog; fires its change event)."""
        r = self.send("Runtime.evaluate", {"expression": f"document.getElementById({json.dumps(element_id)})"})
        self.send("DOM.setFileInputFiles", {"files": [str(p) for p in paths], "objectId": r["result"]["objectId"]})

    def screenshot(self, path):
        """A PNG of the page at path, copied to $LMINF_TEST_ARTIFACTS (a directory, made if missing) when set."""
        Path(path).write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))
        artifacts = os.environ.get("LMINF_TEST_ARTIFACTS")
        if artifacts:
            os.makedirs(artifacts, exist_ok=True)
            shutil.copy(path, os.path.join(artifacts, Path(path).name))

    def check_no_errors(self, allow=None):
        """No console error, no uncaught exception (allow: a regex of expected ones)."""
        self._drain()
        errors = [e for e in self.errors if not (allow and re.search(allow, str(e)))]
        assert not errors, errors


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium)")
    b = Browser()
    try:
        b.send("Browser.getVersion")
        yield b
    finally:
        b.close()


REPLY = "[...document.querySelectorAll('.msg.assistant')].pop()"
IDLE = f"document.body.dataset.state === 'idle' && {REPLY} && {REPLY}.dataset.done === 'true'"


def _texts(page, role):
    return page.js(f"[...document.querySelectorAll('.msg.{role} .content')].map(e => e.textContent)")


@needs_chromium
@needs_default_model
def test_browser_chat_with_the_real_model(browser, tmp_path):
    """The page loads, shows the model and LM-Infinite's window, sends a message typed with Enter (Shift+Enter is
    a new line), and the real model's reply streams into the DOM piece by piece; the cache figures (GET /slots)
    follow the reply; a file attached to the next message is read from the held conversation with the prompt's
    progress shown, then answered; no console error."""
    llm = lminf_gguf.LMInfinite(n_local=256, n_batch=64, n_threads=2, n_gpu_layers=N_GPU_LAYERS)
    srv = Running(llm)
    try:
        page = Page(browser)
        page.open(srv.server.url + "/")
        model = page.js("document.getElementById('model').textContent")
        assert model == srv.server.model_id, model
        window = page.js("document.getElementById('window').textContent")
        assert f"a {llm.n_local}-token window" in window and f"{llm.n_global} sink tokens" in window, window
        page.js("document.getElementById('temperature').value = '0'; document.getElementById('max-tokens').value "
                "= '24'; document.getElementById('system').value = 'You are a helpful assistant.'; true")
        page.js("document.getElementById('input').focus()")
        page.type("What is the capital of France?")
        page.key(shift=True)  # a new line, not a send
        page.type("Answer in one sentence.")
        assert page.js("document.getElementById('input').value") == \
            "What is the capital of France?\nAnswer in one sentence."
        assert not _texts(page, "user")
        started = time.monotonic()
        page.key()
        # streamed: the reply is in the DOM while the request still runs, or else it came in several chunks
        seen_streaming = False
        while not page.js(IDLE):
            seen_streaming |= bool(page.js(f"document.body.dataset.state === 'busy' && {REPLY} && "
                                           f"{REPLY}.querySelector('.content').textContent.length > 0"))
            assert time.monotonic() - started < 30, "no reply within 30 s"
            time.sleep(0.01)
        assert _texts(page, "user") == ["What is the capital of France?\nAnswer in one sentence."]
        [reply] = _texts(page, "assistant")
        chunks = int(page.js(f"{REPLY}.dataset.chunks"))
        assert reply.strip() and chunks >= 2, (reply, chunks)
        assert "Paris" in reply, reply
        assert page.js("document.getElementById('error').hidden") is True
        assert page.js("document.getElementById('input').value") == ""
        # the cache line, from GET /slots after the reply
        page.wait("document.getElementById('status').textContent.includes('tokens read')", what="the cache figures")
        status = page.js("document.getElementById('status').textContent")
        assert status.startswith(f"Cache: lminf: window {llm.n_local}, sinks {llm.n_global}") and \
            "tokens read" in status and "cells" in status and "rebase" in status, status

        # a file with the next question: the held conversation is not read again (cache), the file is, with progress
        notes = tmp_path / "notes.txt"
        notes.write_text("".join(f"Room {i} of the museum shows paintings from the year {1800 + 7 * i}.\n"
                                 for i in range(24)))
        page.set_files("file", [notes])
        page.wait("document.querySelector('.attachment')?.dataset.state === 'read'", what="the file to be read")
        page.js("document.getElementById('input').value = 'Which room shows paintings from 1870?'; true")
        page.click("send")
        page.wait(IDLE + " && document.querySelectorAll('.msg.assistant').length === 2", timeout=60,
                  what="the reply after the file")
        progress = page.js(f"Object.assign({{}}, {REPLY}.dataset)")
        assert int(progress["progress"]) >= 2, progress
        assert progress["processed"] == progress["total"] and 0 < int(progress["cache"]) < int(progress["total"])
        assert _texts(page, "assistant")[-1].strip(), _texts(page, "assistant")
        assert page.js(f"{REPLY}.querySelector('.stats').textContent").startswith("read ")
        page.screenshot(tmp_path / "webui.png")
        print(f"reply {reply!r} in {chunks} chunks (seen streaming: {seen_streaming}); after the file "
              f"{_texts(page, 'assistant')[-1]!r} ({progress}); screenshot {tmp_path / 'webui.png'}")
        page.check_no_errors()
    finally:
        srv.stop()
        llm.close()


@needs_chromium
def test_browser_conversation_stop_errors_and_new_chat(browser):
    """Against the fake engine: the whole conversation (system prompt first) goes with each turn, Stop aborts the
    stream and the server cancels it, a 400 is shown, and New chat starts afresh; no console error."""
    llm = PageFake(delay=0.02)
    srv = Running(llm)
    try:
        page = Page(browser)
        page.open(srv.server.url + "/")
        assert page.js("document.getElementById('model').textContent") == "fake.gguf"
        page.js("localStorage.clear(); document.getElementById('max-tokens').value = '3'; "
                "document.getElementById('system').value = 'Be brief.'; true")
        for text in ("first", "second"):
            page.js(f"document.getElementById('input').value = {json.dumps(text)}; true")
            page.click("send")
            page.wait(IDLE + f" && document.querySelectorAll('.msg.assistant').length === "
                      f"{1 if text == 'first' else 2}", what=f"the reply to {text!r}")
        assert _texts(page, "assistant") == ["w0 w1 w2 ", "w0 w1 w2 "]
        assert llm.calls[-1]["messages"] == [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
            {"role": "assistant", "content": "w0 w1 w2 "}, {"role": "user", "content": "second"}]
        assert llm.calls[-1]["max_tokens"] == 3
        # the conversation is kept in the browser: a reload shows it again
        page.open(srv.server.url + "/")
        assert _texts(page, "user") == ["first", "second"]

        # Stop: a long reply is aborted; the server sees the client leave and ends the generation
        closed = llm.streams_closed
        page.js("document.getElementById('max-tokens').value = '4000'; "
                "document.getElementById('input').value = 'go on'; true")
        page.click("send")
        page.wait(f"document.body.dataset.state === 'busy' && {REPLY}.dataset.chunks > 3", what="streaming")
        page.click("stop")
        page.wait(IDLE, what="the stopped reply")
        assert page.js(f"{REPLY}.querySelector('.note').textContent") == "stopped"
        assert page.js("document.getElementById('error').hidden") is True
        deadline = time.monotonic() + 10
        while llm.streams_closed == closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert llm.streams_closed == closed + 1
        stopped = _texts(page, "assistant")[-1]
        assert 3 < len(stopped.split()) < 4000

        # Regenerate drops the last reply and asks again
        page.js("document.getElementById('max-tokens').value = '2'; true")
        page.click("regenerate")
        page.wait(IDLE + f" && {REPLY}.querySelector('.note')?.textContent === 'cut at max tokens'",
                  what="the regenerated reply")
        assert _texts(page, "assistant")[-1] == "w0 w1 "
        assert llm.calls[-1]["messages"][-1] == {"role": "user", "content": "go on"}

        # an error answer is shown, with the server's message
        page.js(f"document.getElementById('max-tokens').value = '{srv.server.max_tokens_limit + 1}'; "
                "document.getElementById('input').value = 'too long'; true")
        page.click("send")
        page.wait("!document.getElementById('error').hidden", what="the error")
        error = page.js("document.getElementById('error').textContent")
        assert error.startswith("HTTP 400: ") and "max_tokens" in error, error
        # the message that got no answer is back in the input box, and out of the conversation
        assert page.js("document.getElementById('input').value") == "too long"
        assert _texts(page, "user")[-1] == "go on"

        # New chat: nothing left of the conversation
        page.click("new-chat")
        assert not _texts(page, "user") and not _texts(page, "assistant")
        assert page.js("localStorage.getItem('lminf-webui-chat')") is None
        assert page.js("document.getElementById('error').hidden") is True
        # model output is text, never markup
        page.js("document.getElementById('max-tokens').value = '3'; "
                "document.getElementById('input').value = '<b>x</b>'; true")
        page.click("send")
        page.wait(IDLE, what="the reply")
        assert page.js("document.querySelector('.msg.user .content').innerHTML") == "&lt;b&gt;x&lt;/b&gt;"
        page.check_no_errors(allow=r"status of 400")  # the browser logs the refused request itself
    finally:
        srv.stop()



@needs_chromium
def test_browser_asks_for_the_api_key(browser):
    """With --api-key the page loads without one, says that the API wants it, and works once it is entered."""
    llm = PageFake()
    srv = Running(llm, api_key="sekrit")
    try:
        page = Page(browser)
        page.open(srv.server.url + "/")
        assert page.js("document.body.dataset.info") == "failed"
        error = page.js("document.getElementById('error').textContent")
        assert error.startswith("HTTP 401: ") and "API key" in error, error
        assert page.js("document.getElementById('settings').hidden") is False
        page.js("const k = document.getElementById('api-key'); k.value = 'sekrit'; "
                "k.dispatchEvent(new Event('change')); true")
        page.wait("document.body.dataset.info === 'loaded'", what="the info with the key")
        assert page.js("document.getElementById('model').textContent") == "fake.gguf"
        assert page.js("document.getElementById('error').hidden") is True
        page.js("document.getElementById('max-tokens').value = '2'; "
                "document.getElementById('input').value = 'hi'; true")
        page.click("send")
        page.wait(IDLE, what="the reply")
        assert _texts(page, "assistant") == ["w0 w1 "]
        page.check_no_errors(allow=r"status of 401")
    finally:
        srv.stop()


@needs_chromium
def test_browser_conversations_are_kept_switched_and_deleted(browser):
    """Several conversations in localStorage: the single one an earlier page kept is moved into the list; New chat,
    switching (the conversation shown is the one sent) and deleting; titles from the first message."""
    llm = PageFake()
    srv = Running(llm)
    try:
        page = Page(browser)
        page.open(srv.server.url + "/")
        old = [{"role": "user", "content": "old question\nsecond line"}, {"role": "assistant", "content": "old answer"}]
        page.js(f"localStorage.clear(); localStorage.setItem('lminf-webui-chat', {json.dumps(json.dumps(old))}); true")
        page.open(srv.server.url + "/")
        titles = "[...document.querySelectorAll('#chat-list .open')].map(e => e.textContent)"
        assert page.js(titles) == ["old question"]
        assert page.js("localStorage.getItem('lminf-webui-chat')") is None  # moved, once
        assert _texts(page, "user") == ["old question\nsecond line"] and _texts(page, "assistant") == ["old answer"]
        assert page.js("document.querySelector('.chat-item.current .open').textContent") == "old question"

        def say(text, n_assistant):
            page.js(f"document.getElementById('max-tokens').value = '2'; "
                    f"document.getElementById('input').value = {json.dumps(text)}; true")
            page.click("send")
            page.wait(IDLE + f" && document.querySelectorAll('.msg.assistant').length === {n_assistant}",
                      what=f"the reply to {text!r}")

        page.click("new-chat")
        assert not _texts(page, "user") and page.js("document.querySelector('.chat-item.current')") is None
        long = "a new conversation whose first message is longer than a title may be, by some way"
        say(long, 1)
        assert llm.calls[-1]["messages"] == [{"role": "user", "content": long}]
        listed = page.js(titles)
        assert len(listed) == 2 and listed[1] == "old question", listed
        assert listed[0] == long[:59] + "…" and page.js("document.querySelector('.chat-item.current .open')"
                                                         ".textContent") == listed[0]
        # switch back: the old conversation is shown, and is the one sent on
        page.js("document.querySelectorAll('#chat-list .open')[1].click()")
        assert _texts(page, "user") == ["old question\nsecond line"]
        say("follow up", 2)
        assert llm.calls[-1]["messages"] == [{"role": "user", "content": "old question\nsecond line"},
                                             {"role": "assistant", "content": "old answer"},
                                             {"role": "user", "content": "follow up"}]
        assert page.js(titles) == ["old question", long[:59] + "…"]  # the latest first
        # a reload shows the conversation last used, with the list
        page.open(srv.server.url + "/")
        assert _texts(page, "user") == ["old question\nsecond line", "follow up"] and len(page.js(titles)) == 2
        # delete the one shown: the next is shown, and its key is gone
        current = page.js("document.querySelector('.chat-item.current').dataset.id")
        page.js("document.querySelector('.chat-item.current .delete').click()")
        assert page.js(titles) == [long[:59] + "…"] and _texts(page, "user") == [long]
        assert page.js(f"localStorage.getItem('lminf-webui-chat:' + {json.dumps(current)})") is None
        page.js("document.querySelector('.chat-item .delete').click()")
        assert page.js(titles) == [] and not _texts(page, "user")
        assert page.js("JSON.parse(localStorage.getItem('lminf-webui-chats'))") == []
        page.check_no_errors()
    finally:
        srv.stop()


MARKDOWN = """## Steps to *take*

First **bold** and __also bold__, then *italic* and _italic_, `inline <code>` and a_snake_case_name.
A second line of the same paragraph.

- one
- two with **bold**

3. three
4. four

```python
print("<script>alert(1)</script>")
```

[a link](https://example.org/x?a=1) [bad](javascript:alert(1)) [relative](/v1/models) <img src=x onerror=alert(1)>
"""


@needs_chromium
def test_browser_markdown_is_built_as_nodes(browser):
    """The reply's markdown as DOM nodes: headings, paragraphs, bold, italic, inline code, lists, code blocks, links
    (http(s) only, rel=noopener); markup in the model's text stays text. The user's text is shown as typed."""
    llm = PageFake(reply=MARKDOWN)
    srv = Running(llm)
    try:
        page = Page(browser)
        page.open(srv.server.url + "/")
        page.js("document.getElementById('input').value = '**not** markdown'; true")
        page.click("send")
        page.wait(IDLE, what="the reply")
        assert _texts(page, "user") == ["**not** markdown"]
        assert page.js("document.querySelectorAll('.msg.user .content *').length") == 0
        q = "document.querySelector('.msg.assistant .content')"
        tree = page.js(f"[...{q}.children].map(e => e.localName)")
        assert tree == ["h2", "p", "ul", "ol", "pre", "p"], tree
        assert page.js(f"{q}.querySelector('h2').textContent") == "Steps to take"
        assert page.js(f"{q}.querySelector('h2 em').textContent") == "take"
        assert page.js(f"[...{q}.querySelectorAll('p strong')].map(e => e.textContent)") == ["bold", "also bold"]
        assert page.js(f"[...{q}.querySelectorAll('p em')].map(e => e.textContent)") == ["italic", "italic"]
        assert page.js(f"{q}.querySelector('p code').textContent") == "inline <code>"
        assert "a_snake_case_name.\nA second line" in page.js(f"{q}.querySelector('p').textContent")
        assert page.js(f"[...{q}.querySelectorAll('ul li')].map(e => e.textContent)") == ["one", "two with bold"]
        assert page.js(f"{q}.querySelector('ul li strong').textContent") == "bold"
        assert page.js(f"[{q}.querySelector('ol').start, {q}.querySelectorAll('ol li').length]") == [3, 2]
        assert page.js(f"{q}.querySelector('pre code').textContent") == 'print("<script>alert(1)</script>")'
        assert page.js(f"{q}.querySelector('pre code').dataset.lang") == "python"
        links = page.js(f"[...{q}.querySelectorAll('a')].map(a => [a.textContent, a.getAttribute('href'), a.rel, "
                        "a.target])")
        assert links == [["a link", "https://example.org/x?a=1", "noopener noreferrer", "_blank"]], links
        last = page.js(f"{q}.lastElementChild.textContent")
        assert "[bad](javascript:alert(1))" in last and "[relative](/v1/models)" in last, last
        assert "<img src=x onerror=alert(1)>" in last
        assert page.js(f"{q}.querySelectorAll('script, img, iframe, [onerror]').length") == 0
        page.check_no_errors()
    finally:
        srv.stop()


@needs_chromium
def test_browser_attached_file_with_progress_and_stop(browser, tmp_path):
    """A ~20 KB text file attached (the file input, read with FileReader) goes into the next message as
    "File NAME:\\n\\n<text>", shown collapsed with its size; the prompt's progress (return_progress) is shown as a
    bar with tokens/s before the reply; Stop while the prompt is read aborts it and puts the message back; a file
    larger than the server takes is refused on the page, with the limit stated."""
    llm = PageFake(delay=0.01, batches=6, batch_delay=0.15)
    srv = Running(llm, memory_budget=8 * (64 << 10))  # the largest request: 64 KiB
    try:
        page = Page(browser)
        page.open(srv.server.url + "/")
        assert "64.0 KiB" in page.js("document.getElementById('limit').textContent")
        notes = tmp_path / "notes.txt"
        text = "".join(f"Line {i}: the door of house {i} is painted {('red', 'green', 'blue')[i % 3]}.\n"
                       for i in range(500))[:20000]
        notes.write_text(text)
        page.set_files("file", [notes])
        page.wait("document.querySelector('.attachment')?.dataset.state === 'read'", what="the file to be read")
        chip = page.js("document.querySelector('.attachment').textContent")
        assert "notes.txt" in chip and "19.5 KiB" in chip, chip
        page.js("document.getElementById('max-tokens').value = '3'; "
                "document.getElementById('input').value = 'What colour is the door of house 7?'; true")
        page.click("send")
        assert page.js("document.querySelectorAll('.attachment').length") == 0  # sent with the message
        page.wait(f"document.body.dataset.state === 'busy' && {REPLY}?.dataset.progress >= 2 && "
                  f"!!{REPLY}.querySelector('.progress progress')", what="the progress bar")
        bar = page.js(f"{REPLY}.querySelector('.progress').textContent")
        assert bar.startswith("Reading the prompt: ") and "tokens/s" in bar, bar
        page.screenshot(tmp_path / "webui-progress.png")
        page.wait(IDLE, what="the reply after the file")
        assert _texts(page, "assistant") == ["w0 w1 w2 "]
        assert int(page.js(f"{REPLY}.dataset.progress")) == 6
        assert page.js(f"{REPLY}.dataset.processed === {REPLY}.dataset.total")
        assert page.js(f"{REPLY}.querySelector('.progress')") is None  # the bar gives way to the reply
        assert page.js(f"{REPLY}.querySelector('.stats').textContent").startswith("read ")
        sent = llm.calls[-1]
        assert sent["return_progress"] is True
        assert sent["messages"][-1] == {"role": "user", "content": f"File notes.txt:\n\n{text}\n\n"
                                                                   "What colour is the door of house 7?"}
        # shown collapsed, with its size; its text when opened
        box = "document.querySelector('.msg.user details.file')"
        assert page.js(f"{box}.open") is False and page.js(f"{box}.querySelector('pre')") is None
        assert page.js(f"{box}.querySelector('summary').textContent") == \
            "File notes.txt (19.5 KiB, 20,000 characters)"
        assert _texts(page, "user") == ["What colour is the door of house 7?"]
        page.js(f"{box}.open = true; true")
        page.wait(f"!!{box}.querySelector('pre')", what="the file's text")
        assert page.js(f"{box}.querySelector('pre').textContent") == text
        # kept with the conversation
        page.open(srv.server.url + "/")
        assert page.js(f"{box}.querySelector('summary').textContent").startswith("File notes.txt")

        # Stop while the prompt is read: the request ends, the server stops, the message is back in the input
        llm.batches, llm.batch_delay = 50, 0.2
        stopped = llm.progress_stopped
        page.js("document.getElementById('input').value = 'again'; true")
        page.click("send")
        page.wait(f"document.body.dataset.state === 'busy' && {REPLY}?.dataset.progress >= 1", what="progress")
        page.click("stop")
        page.wait("document.body.dataset.state === 'idle'", what="the stop")
        assert page.js("document.getElementById('input').value") == "again"
        assert _texts(page, "assistant") == ["w0 w1 w2 "] and page.js("document.getElementById('error').hidden")
        deadline = time.monotonic() + 10
        while llm.progress_stopped == stopped and time.monotonic() < deadline:
            time.sleep(0.02)
        assert llm.progress_stopped == stopped + 1

        # too large for one request with the conversation: refused before it is read, the limit stated
        big = tmp_path / "big.txt"
        big.write_text("x" * (50 << 10))
        page.set_files("file", [big])
        page.wait("!document.getElementById('error').hidden", what="the refusal")
        error = page.js("document.getElementById('error').textContent")
        assert "big.txt is 50.0 KiB" in error and "64.0 KiB" in error, error
        assert page.js("document.querySelectorAll('.attachment').length") == 0
        page.check_no_errors()
    finally:
        srv.stop()
