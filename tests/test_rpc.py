"""More than one machine (issue 15): llama.cpp's RPC backend. Two `lminf-rpc-server` processes on localhost take the
model's layers; lminf logits equal the local run and the cache stays bounded. Misconfigured servers are clear
errors, never an abort (each check in a child process, so that an abort fails the test instead of the suite)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from lminf_gguf import rpc
from lminf_gguf.errors import InvalidInputError

HERE = Path(__file__).parent

try:
    SERVER = rpc.server_binary()
except FileNotFoundError as e:  # a build with -DLMINF_RPC=off
    SERVER = None
    WHY = str(e)

needs_rpc = pytest.mark.skipif(SERVER is None, reason="built without the RPC backend (-DLMINF_RPC=off)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(procs: list) -> str:
    """An lminf-rpc-server on a free localhost port (appended to procs), once its handshake answers."""
    port = _free_port()
    procs.append(subprocess.Popen([SERVER, "--port", str(port), "--threads", "1"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))
    endpoint = f"127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            rpc.check_server(endpoint, timeout=2)
            return endpoint
        except InvalidInputError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


@pytest.fixture(scope="module")
def rpc_servers():
    """Two lminf-rpc-server processes on localhost: "127.0.0.1:P1,127.0.0.1:P2"."""
    procs = []
    try:
        yield ",".join(_start_server(procs) for _ in range(2))
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def _child(code: str, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)


@needs_rpc
@pytest.mark.parametrize("kv,bound", [("f32", 1e-5), ("f16", 2e-3)])
def test_layers_on_two_rpc_servers_equal_the_local_run(rpc_servers, tiny_model, kv, bound):
    path, _ = tiny_model("f32-gqa2")
    res = _child(f"""
        import json
        import numpy as np
        from conftest import open_exact, random_tokens, rel_err
        toks = [int(t) for t in random_tokens(300, seed=3)]   # G + L = 36: 300 tokens rebase several times
        kw = dict(n_global=4, n_local=32, n_batch=16, n_threads=1, kv={kv!r})
        local = open_exact({path!r}, **kw)
        want = local.logits(toks)
        remote = open_exact({path!r}, rpc_servers={rpc_servers!r}, verbose=True, **kw)
        got = remote.logits(toks)
        print(json.dumps(dict(rel=rel_err(got, want), info=remote.cache_info())))
        """)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # llama.cpp's log (verbose session): the layers went to both servers
    assert "assigned to device RPC0" in res.stderr and "assigned to device RPC1" in res.stderr
    assert out["rel"] < bound, out
    info = out["info"]
    assert info["rebases"] > 0 and info["cells_used"] <= info["cells_bound"]


@needs_rpc
def test_flash_auto_over_rpc_falls_back_exactly(rpc_servers, tiny_model):
    """The RPC devices do not take flash attention's sink-column bias: auto picks the non-flash path there."""
    path, _ = tiny_model("f32-gqa2")
    res = _child(f"""
        import json
        from conftest import open_exact, random_tokens, rel_err
        toks = [int(t) for t in random_tokens(120, seed=4)]
        kw = dict(n_global=4, n_local=32, n_batch=16, n_threads=1)
        want = open_exact({path!r}, **kw).logits(toks)
        remote = open_exact({path!r}, rpc_servers={rpc_servers!r}, flash_attn=None, **kw)
        print(json.dumps(dict(rel=rel_err(remote.logits(toks), want), flash=remote.cache_info()["flash_attn"])))
        """)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["flash"] is False and out["rel"] < 1e-5, out


@needs_rpc
@pytest.mark.parametrize("when", ["between calls", "during a call"])
def test_a_server_that_goes_away_fails_the_call_not_the_process(tiny_model, when):
    """A server killed mid-session: llama.cpp's RPC client aborted the process (patch 0021 gives it an error path).
    The call that meets the dead server raises RemoteServerError, so does every later one on that model and a new
    session on it, and the process goes on: a local session still computes. "during a call": the server is killed
    between two decodes of one eval() call."""
    path, _ = tiny_model("f32-gqa2")
    procs = []
    try:
        endpoint = _start_server(procs)
        proc = procs[0]
        res = _child(f"""
            import os, signal, time
            import lminf_gguf
            from conftest import open_exact, random_tokens
            toks = [int(t) for t in random_tokens(4000, seed=5)]
            kw = dict(n_global=4, n_local=32, n_batch=16, n_threads=1)
            model = lminf_gguf.Model({path!r}, rpc_servers={endpoint!r})
            llm = lminf_gguf.LMInfinite(model, **kw)
            llm.feed(toks[:100])                       # works while the server runs
            def kill():
                os.kill({proc.pid}, signal.SIGKILL)
                time.sleep(0.5)
            if {when!r} == "between calls":
                kill()
            for attempt in ("this call", "the next call"):
                try:
                    for i, _ in enumerate(llm.eval(toks[100:])):   # one call, n_batch tokens per decode
                        if i == 3 and attempt == "this call" and {when!r} == "during a call":
                            kill()
                    print("no error", attempt)
                except lminf_gguf.RemoteServerError as e:
                    print("RemoteServerError", attempt, "went away" in str(e))
            try:
                lminf_gguf.LMInfinite(model, **kw)
                print("no error", "new session")
            except lminf_gguf.RemoteServerError:
                print("RemoteServerError", "new session", True)
            try:   # the cache there reads as zeros now: no state file of them
                llm.save_state("/nonexistent-dir-is-fine/s.state")
                print("no error", "save_state")
            except lminf_gguf.RemoteServerError:
                print("RemoteServerError", "save_state", True)
            try:   # another model on that endpoint while the broken connection is still held
                lminf_gguf.Model({path!r}, rpc_servers={endpoint!r})
                print("no error", "new model")
            except lminf_gguf.RemoteServerError as e:
                print("RemoteServerError", "new model", "close every Model" in str(e))
            local = open_exact({path!r}, **kw)
            print("local", local.logits(toks[:50]).shape)
            """)
        assert res.returncode == 0, res.stderr[-3000:]
        lines = res.stdout.strip().splitlines()
        assert lines == ["RemoteServerError this call True", "RemoteServerError the next call True",
                         "RemoteServerError new session True", "RemoteServerError save_state True",
                         "RemoteServerError new model True",
                         "local (50, 96)"], res.stdout
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


@pytest.fixture
def netns_link():
    """A network namespace behind a veth pair: (namespace, its interface); 10.77.0.1 here, 10.77.0.2 there. Skips
    where this machine does not let the tests make one (not root, no iproute2, no namespaces)."""
    tag = os.getpid() % 100000
    ns, here, there = f"lminf{tag}", f"lmva{tag}", f"lmvb{tag}"
    steps = [["ip", "netns", "add", ns], ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
             ["ip", "link", "set", there, "netns", ns], ["ip", "addr", "add", "10.77.0.1/24", "dev", here],
             ["ip", "link", "set", here, "up"],
             ["ip", "netns", "exec", ns, "ip", "addr", "add", "10.77.0.2/24", "dev", there],
             ["ip", "netns", "exec", ns, "ip", "link", "set", there, "up"],
             ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]]
    try:
        for step in steps:
            if subprocess.run(step, capture_output=True).returncode != 0:
                pytest.skip(f"cannot make a network namespace here ({' '.join(step)} failed)")
        yield ns, there
    except FileNotFoundError:
        pytest.skip("no iproute2 (ip) on this machine")
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", here], capture_output=True)


@needs_rpc
def test_a_server_cut_off_the_network_fails_the_call_within_a_minute(tiny_model, netns_link):
    """A server machine that vanishes without closing the connection (here: its address removed in its network
    namespace, so packets to it are dropped in silence): the client's data stays unacknowledged and no answer comes.
    llama.cpp's client retransmitted for about 15 minutes; patch 0021's keep-alive settings (TCP_USER_TIMEOUT 30 s)
    fail the connection, and the call raises RemoteServerError."""
    ns, there = netns_link
    path, _ = tiny_model("f32-gqa2")
    server = subprocess.Popen(["ip", "netns", "exec", ns, SERVER, "--host", "10.77.0.2", "--port", "50052",
                               "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = None
    try:
        deadline = time.time() + 30
        while True:
            try:
                rpc.check_server("10.77.0.2:50052", timeout=2)
                break
            except InvalidInputError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            import lminf_gguf
            from conftest import random_tokens
            toks = [int(t) for t in random_tokens(400, seed=6)]
            model = lminf_gguf.Model({path!r}, rpc_servers="10.77.0.2:50052")
            llm = lminf_gguf.LMInfinite(model, n_global=4, n_local=32, n_batch=16, n_threads=1)
            llm.feed(toks[:100])
            print("ready", flush=True)
            sys.stdin.readline()                     # the parent has cut the server off
            t = time.time()
            try:
                llm.feed(toks[100:])
                print("no error", flush=True)
            except lminf_gguf.RemoteServerError:
                print("RemoteServerError", round(time.time() - t), flush=True)
            """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()[-2000:]
        subprocess.run(["ip", "netns", "exec", ns, "ip", "addr", "flush", "dev", there], check=True)
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=150)
        assert child.returncode == 0, err[-2000:]
        verdict, seconds = out.split()
        assert verdict == "RemoteServerError" and int(seconds) < 90, out
    finally:
        for p in (child, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)


@needs_rpc
@pytest.mark.parametrize("servers,message", [
    ("127.0.0.1", "is not HOST:PORT"),
    ("127.0.0.1:0", "is not HOST:PORT"),
    ("[::1]:50052", "no IPv6 address"),
    ("127.0.0.1:{closed}", "cannot reach RPC server"),
    ("127.0.0.1:{rude}", "is not a compatible RPC server"),
])
def test_bad_rpc_servers_are_clear_errors_not_aborts(tiny_model, servers, message):
    """llama.cpp aborts on an endpoint it cannot parse, reach or shake hands with: each is refused first."""
    path, _ = tiny_model("f32-gqa2")
    rude = socket.socket()  # accepts and hangs up at once: something listens, but not an RPC server
    rude.bind(("127.0.0.1", 0))
    rude.listen(8)

    def hang_up():
        while True:
            try:
                conn, _ = rude.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        servers = servers.format(closed=_free_port(), rude=rude.getsockname()[1])
        res = _child(f"""
            import lminf_gguf
            try:
                lminf_gguf.LMInfinite({path!r}, rpc_servers={servers!r}, n_threads=1)
            except lminf_gguf.InvalidInputError as e:
                print("refused:", e)
            """, timeout=60)
    finally:
        rude.close()
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("refused:") and message in res.stdout, res.stdout


# endpoints that passed the old check (str.isdigit, int) or that ctypes cuts, and llama.cpp then aborted on
# ("Failed to parse endpoint", "Failed to connect"), or that its parser reads differently from Python
HOSTILE_ENDPOINTS = [
    "127.0.0.1:\uff15\uff10\uff11\uff11\uff11",   # full-width digits: isdigit() and int() take them
    "127.0.0.1:\u0665\u0660\u0660\u0665\u0662",   # Arabic-Indic digits
    "127.0.0.1:50052\x00", "127.0.0.1\x00:50052", "loc\x00alhost:50052",   # ctypes cuts at the NUL
    "127.0.0.1:+50052", "127.0.0.1: 50052", "127.0.0.1:50052abc", "127.0.0.1:-1", "127.0.0.1:1_000",
    "127.0.0.1:99999999999", "127.0.0.1:" + "9" * 5000,   # int() of 5000 digits raises ValueError itself
    "127.0.0.1 :50052", "127.0.0.1\t:50052", "127.0.0.1\r:50052", "127.0.0.1\x1b:50052", "h\u00e9llo:50052",
    "a b:50052", "[::1]:50052", "[::1]", "::1:50052", "x" * 300 + ":50052",
    "a" * 64 + ":50052", "a..b:50052",   # the IDNA codec refuses these labels (UnicodeError) when resolving
    "nonexistent.invalid:50052",
]


def test_rpc_server_list_parsing():
    assert rpc.parse_servers("a:1, b:2") == ["a:1", "b:2"]
    assert rpc.parse_endpoint("my-host_1.lan:00080") == ("my-host_1.lan", 80)
    # IPv6 literals: llama.cpp's endpoint parser splits at the first ':' and aborts on them
    for bad in ("", "a", "a:b", "a:70000", ",".join(f"h:{i + 1}" for i in range(17)), "[::1]:50052", "::1:50052",
                [b"a:1"], [None]):
        with pytest.raises(InvalidInputError):
            rpc.parse_servers(bad)
    # the resolvable-looking ones are refused when checked (check_server), the others when parsed
    for bad in HOSTILE_ENDPOINTS[:-3]:
        with pytest.raises(InvalidInputError):
            rpc.parse_servers(bad)
        with pytest.raises(InvalidInputError):
            rpc.parse_servers([bad])


@needs_rpc
def test_hostile_endpoints_are_refused_not_aborts(tiny_model):
    """Each endpoint above given to a session in a child process: InvalidInputError, and the child lives (an abort in
    llama.cpp's parser or connect would kill it: the last line printed names the endpoint)."""
    path, _ = tiny_model("f32-gqa2")
    res = _child(f"""
        import lminf_gguf
        for endpoint in {HOSTILE_ENDPOINTS!r}:
            print("trying", ascii(endpoint)[:60], flush=True)
            try:
                lminf_gguf.LMInfinite({path!r}, rpc_servers=endpoint, n_threads=1)
                print("accepted", flush=True)
            except lminf_gguf.InvalidInputError as e:
                print("refused", flush=True)
        print("alive")
        """, timeout=120)
    assert res.returncode == 0, (res.stdout[-500:], res.stderr[-2000:])
    lines = res.stdout.split()
    assert lines.count("refused") == len(HOSTILE_ENDPOINTS) and "accepted" not in lines, res.stdout
    assert lines[-1] == "alive"


def _stop(proc) -> None:
    os.kill(proc.pid, signal.SIGSTOP)


def _end(proc) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.wait(10)


@needs_rpc
@pytest.mark.parametrize("call", ["feed", "one decode"])
def test_a_stopped_server_fails_the_call_after_the_timeout(tiny_model, call):
    """A server that stops answering without closing its connection (SIGSTOP: its kernel still acknowledges data
    and answers keep-alive probes, so 0021's keep-alive settings do not see it) held the caller inside llama_decode
    forever. Patch 0022 gives every wait for a server a deadline: with a 3 s timeout the call raises
    RemoteServerError after about 3 s, later calls at once, and the session and model close without waiting.
    "one decode": a call of a single llama_decode, whose wait for the server is in the output read that follows
    it (llama_decode returns before the backends finish): the session must synchronise before it asks whether a
    server failed, or the zeros of the failed read come back as that call's logits, without an error."""
    path, _ = tiny_model("f32-gqa2")
    # n_local 256: no window move (K-shift) at the start of the decode, so the first wait is for its output
    run = "llm.feed(toks[100:])" if call == "feed" else "[r.copy() for r in llm.eval(toks[100:116])]"
    procs = []
    child = None
    try:
        endpoint = _start_server(procs)
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            import lminf_gguf
            from lminf_gguf import rpc
            from conftest import random_tokens
            toks = [int(t) for t in random_tokens(400, seed=7)]
            rpc.set_timeout(3)
            model = lminf_gguf.Model({path!r}, rpc_servers={endpoint!r})
            llm = lminf_gguf.LMInfinite(model, n_global=4, n_local=256, n_batch=16, n_threads=1)
            llm.feed(toks[:100])
            print("ready", flush=True)
            sys.stdin.readline()                     # the parent has stopped the server
            for attempt in ("this call", "the next call"):
                t = time.time()
                try:
                    {run}
                    print("no error", attempt, flush=True)
                except lminf_gguf.RemoteServerError:
                    print("RemoteServerError", attempt, round(time.time() - t, 1), flush=True)
            print(lminf_gguf._lib.last_errors(), file=sys.stderr)   # the RPC client's log (its own thread)
            t = time.time()
            llm.close()
            model.close()
            print("closed", round(time.time() - t, 1), flush=True)
            """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()[-2000:]
        _stop(procs[0])
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err[-2000:]
        lines = [line.split() for line in out.strip().splitlines()]
        assert [line[:-1] for line in lines] == [["RemoteServerError", "this", "call"],
                                                 ["RemoteServerError", "the", "next", "call"], ["closed"]], out
        assert 2.5 <= float(lines[0][-1]) < 20, out
        assert float(lines[1][-1]) < 1 and float(lines[2][-1]) < 5, out
        assert "did not answer for" in err, err[-2000:]
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(10)
        for p in procs:
            _end(p)


@needs_rpc
def test_cancel_cuts_a_stalled_wait_short_and_only_a_stalled_one(tiny_model):
    """cancel() during a call that waits for a stopped server: the wait ends (RemoteServerError) once it has lasted
    CANCEL_WAIT_S, not after the timeout (300 s here). Before that, the same session is cancelled again and again
    while the server answers: nothing is cut (the wait bound of a cancel lasts only while its decode runs), and the
    stalled call is still waiting 8 s later, until the cancel. Through the session's cancel() where the engine
    wraps its decodes in rpc.DecodeCancel, else through a DecodeCancel around the call."""
    path, _ = tiny_model("f32-gqa2")
    procs = []
    child = None
    try:
        endpoint = _start_server(procs)
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sys, threading, time
            import lminf_gguf
            from lminf_gguf import rpc
            from conftest import random_tokens
            toks = [int(t) for t in random_tokens(800, seed=8)]
            rpc.set_timeout(300)
            model = lminf_gguf.Model({path!r}, rpc_servers={endpoint!r})
            llm = lminf_gguf.LMInfinite(model, n_global=4, n_local=32, n_batch=16, n_threads=1)
            hooked = getattr(llm, "_rpc_cancel", None) is not None
            guard = rpc.DecodeCancel(model.rpc_servers)
            cancel = llm.cancel if hooked else guard.cancel
            def call(tokens):
                if hooked:
                    return llm.feed(tokens)
                with guard.decoding():
                    return llm.feed(tokens)
            def run(tokens, out):
                t = time.time()
                try:
                    call(tokens)
                    out.append("done")
                except lminf_gguf.Cancelled:
                    out.append("Cancelled")
                except lminf_gguf.RemoteServerError:
                    out.append("RemoteServerError")
                out.append(time.time() - t)
            # 1. a healthy server, cancelled every 10 ms: nothing is cut
            out = []
            th = threading.Thread(target=run, args=(toks[:400], out), daemon=True)
            th.start()
            while th.is_alive():
                cancel()
                time.sleep(0.01)
            print("healthy", out[0], flush=True)
            llm.feed(toks[400:500])
            print("after", rpc.failed_servers(model.rpc_servers), flush=True)
            sys.stdin.readline()                     # the parent has stopped the server
            # 2. a stopped server: still waiting after 8 s (no cancel pending), then cancelled
            out = []
            th = threading.Thread(target=run, args=(toks[500:], out), daemon=True)
            th.start()
            th.join(8)
            print("waiting", th.is_alive(), flush=True)
            t = time.time()
            cancel()
            th.join(60)
            print(lminf_gguf._lib.last_errors(), file=sys.stderr)
            print("cancelled", out[0] if out else "still-waiting", round(time.time() - t, 1),
                  "hooked" if hooked else "guard", flush=True)
            """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
        assert child.stdout.readline().split()[0] == "healthy", child.stderr.read()[-2000:]
        assert child.stdout.readline().strip() == "after []"
        _stop(procs[0])
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err[-2000:]
        lines = out.strip().splitlines()
        assert lines[0] == "waiting True", out
        verdict = lines[1].split()
        assert verdict[:2] == ["cancelled", "RemoteServerError"] and float(verdict[2]) < 3, out
        assert "gave up waiting" in err, err[-2000:]
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(10)
        for p in procs:
            _end(p)


@needs_rpc
def test_lminf_rpc_server_cli_runs_the_bundled_server():
    exe = str(Path(sys.executable).with_name("lminf"))
    port = _free_port()
    proc = subprocess.Popen([exe, "rpc-server", "--port", str(port), "-t", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                rpc.check_server(f"127.0.0.1:{port}", timeout=2)
                break
            except InvalidInputError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
