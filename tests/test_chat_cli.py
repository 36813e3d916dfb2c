"""`lminf chat` driven through stdin (a pipe), its commands, errors, Ctrl-C, and --help everywhere."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import needs_default_model

needs_default = needs_default_model

EXE = str(Path(sys.executable).with_name("lminf"))
CHAT = [EXE, "chat", "-n", "12", "--temp", "0", "--n-local", "128", "-b", "64", "-t", "1"]


def _chat(script: str, tmp_path, *extra):
    return subprocess.run(CHAT + list(extra), input=script, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


@needs_default
def test_chat_through_a_pipe(tmp_path):
    state = tmp_path / "chat.lminf"
    script = "\n".join([
        "What is the capital of France?",
        f"/save {state}",
        "Tell me more about it.",
        "/load /nonexistent/state",
        f"/load {state}",
        "/bogus",
        "Tell me more about it.",
        "/reset",
        "What is the capital of France?",
        "/quit",
        "this line is never read",
    ]) + "\n"
    res = _chat(script, tmp_path, "--system", "You are a geography teacher.")
    assert res.returncode == 0, res.stderr
    replies = res.stdout.splitlines()
    assert len(replies) == 4 and all(r.strip() for r in replies)
    assert replies[1] == replies[2]          # after /load the conversation continues as it did after /save
    assert replies[0] == replies[3]          # after /reset it starts again
    err = res.stderr
    assert "Traceback" not in err
    assert "saved 3 messages" in err and "loaded 3 messages" in err and "conversation reset" in err
    assert "lminf: error: cannot read state file /nonexistent/state" in err
    assert "lminf: error: unknown command /bogus" in err
    assert state.stat().st_size > 0


@needs_default
def test_chat_long_history_stays_bounded(tmp_path):
    script = "".join(f"Give me a fact about the number {i}.\n" for i in range(25))
    res = _chat(script, tmp_path, "--n-local", "64", "-n", "8")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 25 and "Traceback" not in res.stderr


@needs_default
def test_ctrl_c_stops_the_reply_and_keeps_the_session(tmp_path):
    proc = subprocess.Popen([EXE, "chat", "-n", "100000", "--temp", "0", "--n-local", "128", "-t", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        proc.stdin.write("Write the numbers from 1 to 1000, separated by commas.\n")
        proc.stdin.flush()
        proc.stdout.read(8)                  # the reply has started
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("/quit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "(reply stopped)" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [["--help"], ["chat", "--help"], ["generate", "--help"], ["info", "--help"]])
def test_help_everywhere(args, tmp_path):
    res = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("usage: lminf")


@pytest.mark.parametrize("args", [["chat", "-m", "/nonexistent.gguf"], ["chat", "--n-local", "0"],
                                  ["generate", "-f", "/nonexistent.txt"]])
def test_chat_bad_input_is_one_line(args, tmp_path):
    res = subprocess.run([EXE, *args], input="", capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("lminf: error:") and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
