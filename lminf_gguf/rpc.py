"""llama.cpp's RPC backend: a model's layers computed by `lminf rpc-server` processes on other machines.

    lminf rpc-server --host 0.0.0.0 --port 50052        # on each machine that lends its memory and cores
    lminf serve --rpc 10.0.0.2:50052,10.0.0.3:50052     # here: layers spread over them in proportion to memory

rpc_servers ("HOST:PORT,HOST:PORT") names the servers; the layers go to them (n_gpu_layers defaults to all of
them), the embeddings, the LM-Infinite bookkeeping and the sampling stay here. Every server must run the
lminf-rpc-server of the same lminf_gguf build (the same patched ggml). llama.cpp aborts the process when it cannot
reach a server or speaks another protocol version, so each server is checked here first, with the protocol's
own handshake (a clear error instead). A server that goes away during a session fails that call and every later
one on the Model with RemoteServerError (patch 0021 gives llama.cpp's RPC client that error path; it used to end
the process), also one cut off the network without closing its connection (keep-alive probes and a 30 s bound on
unacknowledged data, about half a minute), and one that stops answering while its connection stays up (a stopped
or hung process) after TIMEOUT_S without a byte (patch 0022; set_timeout, or Model(rpc_timeout=...)). A session's
cancel() cuts such a wait short (DecodeCancel). The RPC protocol has no authentication or encryption: keep the
servers on a private network.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import socket
import struct
import subprocess
import sys
import threading
from typing import List, Optional, Tuple

from . import _lib
from .errors import InvalidInputError, RemoteServerError

__all__ = ["parse_endpoint", "parse_servers", "check_server", "rpc_devices", "failed_servers", "set_timeout",
           "DecodeCancel", "local_gpus", "server_binary", "add_parser", "main"]

# ggml-rpc's protocol (ggml/src/ggml-rpc/ggml-rpc.cpp, ggml-rpc.h of the pinned tree)
_CMD_HELLO = 14
_CAPS_SIZE = 24
_PROTO_MAJOR, _PROTO_MINOR = 7, 0
HANDSHAKE_TIMEOUT_S = 10.0
# patch 0022: the longest wait for a server that sends nothing (its default; set_timeout changes it), and how long a
# wait must have lasted for a cancel to cut it (RPC_ABORT_WAIT_MS)
TIMEOUT_S = 120.0
CANCEL_WAIT_S = 5.0
# what llama.cpp's client resolves with gethostbyname(): a host name or an IPv4 address, in ASCII
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")

_lock = threading.Lock()
_connected: set = set()  # endpoints this process already uses: llama.cpp keeps one connection per endpoint


def parse_endpoint(endpoint) -> Tuple[str, int]:
    """(host, port) of "HOST:PORT", or InvalidInputError: the one check of an endpoint before llama.cpp sees it.

    It mirrors llama.cpp's client (ggml-rpc.cpp): parse_endpoint() takes the host up to the first ':' and
    std::stoi() of the rest as the port, and aborts the process when that fails; socket_t::connect() resolves the
    host with gethostbyname() over IPv4 only, and aborts when it cannot connect. What it would read differently
    from here is refused: a port of anything but 1-5 ASCII digits (stoi and str.isdigit() take signs, spaces,
    trailing text or non-ASCII digits like '５'), a value outside 1..65535, a host that is not a host name or an
    IPv4 address in ASCII letters, digits, '.', '-' and '_' (a NUL would cut the C string, a space or a control
    character is never a host), and IPv6 addresses, bracketed or not (no IPv6 in that client).
    """
    if not isinstance(endpoint, str):
        raise InvalidInputError(f"rpc_servers: {endpoint!r} is not HOST:PORT")
    host, sep, port = endpoint.partition(":")  # llama.cpp: endpoint.find(':')
    if ":" in port or "[" in host:
        raise InvalidInputError(f"rpc_servers: {endpoint!r}: llama.cpp's RPC client takes no IPv6 address; use a "
                                "host name or an IPv4 address")
    if not sep or not host or not (0 < len(port) <= 5 and port.isascii() and port.isdigit()) \
            or not 0 < int(port) < 65536:
        raise InvalidInputError(f"rpc_servers: {endpoint!r} is not HOST:PORT (port 1..65535, ASCII digits)")
    if len(host) > 253 or not _HOST_CHARS.issuperset(host):
        raise InvalidInputError(f"rpc_servers: {endpoint!r} is not HOST:PORT: the host must be a host name or an IPv4 "
                                "address (ASCII letters, digits, '.', '-', '_')")
    return host, int(port)


def parse_servers(servers) -> List[str]:
    """"HOST:PORT,HOST:PORT" (or a list of them) as a list of endpoints; InvalidInputError names a bad one."""
    items = servers.split(",") if isinstance(servers, str) else list(servers or [])
    out = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()  # "a:1, b:2"; blanks inside an endpoint are refused
        parse_endpoint(item)
        out.append(item)
    if not out:
        raise InvalidInputError("rpc_servers: no server given")
    if len(out) > 16:  # GGML_RPC_MAX_SERVERS
        raise InvalidInputError(f"rpc_servers: at most 16 servers, not {len(out)}")
    return out


def check_server(endpoint: str, timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
    """Connect and run the RPC handshake (HELLO); InvalidInputError when the server cannot be reached, does not
    answer (a server serves one client at a time) or speaks another protocol version."""
    host, port = parse_endpoint(endpoint)
    try:
        # resolved as llama.cpp's client will (gethostbyname, IPv4, the first address): a name that resolves to IPv6
        # only is refused here, not an abort there
        address = socket.gethostbyname(host)
    except (OSError, UnicodeError) as e:  # UnicodeError: a label the IDNA codec refuses (empty, over 63 characters)
        raise InvalidInputError(f"cannot reach RPC server {endpoint}: cannot resolve {host!r} to an IPv4 address "
                                f"({getattr(e, 'strerror', None) or e})") from None
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except socket.timeout:
        raise InvalidInputError(f"cannot reach RPC server {endpoint} within {timeout:g} s") from None
    except OSError as e:
        raise InvalidInputError(f"cannot reach RPC server {endpoint}: {e.strerror or e}") from None
    data = b""
    with sock:
        try:
            sock.sendall(struct.pack("<BQ", _CMD_HELLO, _CAPS_SIZE) + bytes(_CAPS_SIZE))
            while len(data) < 8 + 4 + _CAPS_SIZE:
                part = sock.recv(64)
                if not part:
                    break
                data += part
        except socket.timeout:
            raise InvalidInputError(f"RPC server {endpoint} did not answer within {timeout:g} s (is it serving "
                                    "another client? an rpc-server serves one at a time)") from None
        except OSError:
            # something accepted the connection and hung up: whether that reads as an end of stream or as a
            # reset depends on timing, and it is the same answer (no handshake)
            pass
    if len(data) < 12 or struct.unpack("<Q", data[:8])[0] != 4 + _CAPS_SIZE:
        raise InvalidInputError(f"{endpoint} is not a compatible RPC server (no valid handshake answer; run "
                                "`lminf rpc-server` of this lminf_gguf there)")
    major, minor = data[8], data[9]
    if major != _PROTO_MAJOR or minor > _PROTO_MINOR:
        raise InvalidInputError(f"RPC server {endpoint} speaks protocol {major}.{minor}, this build "
                                f"{_PROTO_MAJOR}.{_PROTO_MINOR}: run the lminf rpc-server of this lminf_gguf there")


def _bind(name, argtypes, restype):
    fn = getattr(_lib.lib, name)  # ggml's functions, found through libllama's dependencies
    fn.argtypes, fn.restype = argtypes, restype
    return fn


@functools.lru_cache(maxsize=None)
def _rpc_proc(name: str):
    """The address of a function the RPC backend's registry exports, or None (no RPC backend in this build)."""
    reg = _bind("ggml_backend_reg_by_name", [ctypes.c_char_p], ctypes.c_void_p)(b"RPC")
    proc = _bind("ggml_backend_reg_get_proc_address", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p)
    return proc(reg, name.encode()) if reg else None


def rpc_devices(servers, timeout: Optional[float] = None) -> list:
    """The ggml devices of the RPC servers (each checked first), for llama_model_params.devices. timeout: as for
    set_timeout (None: the process's setting stays)."""
    endpoints = parse_servers(servers)
    if timeout is not None:
        set_timeout(timeout)
    dev_count = _bind("ggml_backend_reg_dev_count", [ctypes.c_void_p], ctypes.c_size_t)
    dev_get = _bind("ggml_backend_reg_dev_get", [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_void_p)
    addr = _rpc_proc("ggml_backend_rpc_add_server")
    if not addr:
        raise InvalidInputError("this lminf_gguf was built without the RPC backend (it was built with -DLMINF_RPC=off)")
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(addr)
    devices = []
    with _lock:
        for endpoint in endpoints:
            if endpoint not in _connected:
                check_server(endpoint)
            elif failed_servers([endpoint]):
                # llama.cpp keeps one connection per endpoint while a model uses it: a broken one would be reused
                # and the load would fail with a misleading "failed to allocate ... buffer"
                raise RemoteServerError(f"the connection to RPC server {endpoint} broke earlier and an open model "
                                        "still holds it: close every Model (and session) using that server, then "
                                        "load again")
            server_reg = add_server(endpoint.encode())
            if not server_reg:
                raise InvalidInputError(f"RPC server {endpoint} offers no device")
            _connected.add(endpoint)
            devices += [dev_get(server_reg, i) for i in range(dev_count(server_reg))]
    return devices


@functools.lru_cache(maxsize=None)
def _get_failed():
    """ggml_backend_rpc_get_failed (patch 0021), or None in a build without the RPC backend."""
    addr = _rpc_proc("ggml_backend_rpc_get_failed")
    return ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_char_p)(addr) if addr else None


def failed_servers(endpoints: List[str]) -> List[str]:
    """The endpoints (parse_servers' list) whose connection broke while in use (asked before and after every
    decode, so the list is parsed once, by the Model)."""
    get_failed = _get_failed()
    return [e for e in endpoints if get_failed(e.encode())] if get_failed else []


def set_timeout(seconds: float) -> None:
    """The longest wait for an RPC server that sends nothing (patch 0022), for every connection of this process
    (llama.cpp keeps one per endpoint, shared by the Models on it); 0: no bound. Default TIMEOUT_S. After it the
    call fails with RemoteServerError, as if the server had gone away.

    The longest silence of a healthy server is one graph computation (a ubatch through its share of the layers):
    tens of seconds for a large model on a CPU at n_batch 512. A bound that cuts it fails the model for good (it
    must be loaded again), while a long bound only delays the error of a server that is already stuck, and
    cancel() cuts that short; hence a generous default."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds < 0:
        raise InvalidInputError(f"rpc_timeout must be a number of seconds >= 0 (0: no bound), not {seconds!r}")
    addr = _rpc_proc("ggml_backend_rpc_set_timeout")
    if not addr:
        raise InvalidInputError("this lminf_gguf's library has no RPC timeout (built without the RPC backend, or "
                                "before patch 0022)")
    ms = 0 if seconds == 0 else max(1, round(seconds * 1000))
    ctypes.CFUNCTYPE(None, ctypes.c_int64)(addr)(ms)


@functools.lru_cache(maxsize=None)
def _set_abort_fn():
    """ggml_backend_rpc_set_abort (patch 0022), or None."""
    addr = _rpc_proc("ggml_backend_rpc_set_abort")
    return ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_bool)(addr) if addr else None


class DecodeCancel:
    """A session's cancel() for the waits of llama.cpp's RPC client (patch 0022): the decode itself cannot be told to
    stop while its thread waits for a server's answer. A cancel during decoding() lets a wait for one of the
    endpoints that has lasted CANCEL_WAIT_S end, which fails the connection (the call raises RemoteServerError and
    the Model must be loaded again): a stopped or hung server no longer holds the call until the timeout. A
    server that answers within CANCEL_WAIT_S is not cut, and the call stops after the decode as before.

    The session wraps each llama_decode in decoding() and calls cancel() from its own cancel(); the hold on the
    endpoints lasts until that decode returns (llama.cpp counts the holds of every session on an endpoint)."""

    def __init__(self, endpoints: Optional[List[str]]):
        self.endpoints = [e.encode() for e in endpoints or []]
        self._lock = threading.RLock()  # re-entrant: cancel() may come from a signal handler of the decoding thread
        self._decoding = False
        self._held = False

    @contextlib.contextmanager
    def decoding(self):
        with self._lock:
            self._decoding = True
        try:
            yield
        finally:
            with self._lock:
                self._decoding = False
                if self._held:
                    self._held = False
                    self._set(False)

    def cancel(self) -> None:
        with self._lock:
            if self._decoding and not self._held and self.endpoints:
                self._held = True
                self._set(True)

    def _set(self, abort: bool) -> None:
        fn = _set_abort_fn()
        if fn:
            for endpoint in self.endpoints:
                fn(endpoint, abort)


def local_gpus() -> list:
    """This machine's own GPUs (they keep their share of the layers next to the RPC servers)."""
    count = _bind("ggml_backend_dev_count", [], ctypes.c_size_t)
    get = _bind("ggml_backend_dev_get", [ctypes.c_size_t], ctypes.c_void_p)
    kind = _bind("ggml_backend_dev_type", [ctypes.c_void_p], ctypes.c_int)
    return [get(i) for i in range(count()) if kind(get(i)) in (1, 2)]  # GGML_BACKEND_DEVICE_TYPE_GPU, _IGPU


def server_binary() -> str:
    """Path of the lminf-rpc-server built with this package."""
    name = "lminf-rpc-server.exe" if sys.platform == "win32" else "lminf-rpc-server"
    path = _lib.LIB_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this lminf_gguf was built without the RPC backend "
                                "(it was built with CMAKE_ARGS=-DLMINF_RPC=off)")
    return str(path)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "rpc-server", help="lend this machine's memory and cores to a model served elsewhere (llama.cpp RPC)",
        description="Run llama.cpp's rpc-server (built with this lminf_gguf): a client started with --rpc "
                    "HOST:PORT puts some of a model's layers here. No authentication: private networks only.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50052, help="port (default 50052)")
    p.add_argument("--threads", "-t", type=int, help="CPU threads (default: llama.cpp's)")
    p.add_argument("--cache", action="store_true", help="cache tensors on local disk (faster reloads)")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, not {args.port}")
    cmd = [server_binary(), "--host", args.host, "--port", str(args.port)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.cache:
        cmd.append("--cache")
    if os.name == "posix":
        os.execv(cmd[0], cmd)  # the server takes this process's place (signals reach it directly)
    return subprocess.call(cmd)
