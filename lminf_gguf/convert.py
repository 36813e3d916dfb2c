"""Hugging Face -> GGUF conversion, quantisation, LM-Infinite metadata, and a model summary without loading it.

    convert("path/to/hf-model", "model.gguf", outtype="f16", quant="Q4_K_M", n_global=10, n_local=4096)
    set_metadata("model.gguf", {"lminf.n_global": 10, "lminf.n_local": 4096, "lminf.dist_max": 4096})
    describe("model.gguf")      # architecture, context, rope, lminf.* keys, tensor types, LM-Infinite support

Conversion runs llama.cpp's own convert_hf_to_gguf.py, from the same pinned tree the library is built from, in a
subprocess of this Python. The install ships that script with its `conversion` package, the chat templates and the
gguf-py it was written against in lminf_gguf/_convert (CMakeLists.txt), so an installed package needs no checkout;
LMINF_CONVERTER_DIR points at another llama.cpp tree, and a development checkout falls back to
third_party/llama.cpp. The converter needs torch, transformers, sentencepiece and safetensors in this Python.
Quantisation is llama.cpp's llama_model_quantize from the patched library (through llama-cpp-python's binding).

Every output is written to a temporary file in the output's directory and renamed over the target at the end: a
failure, or an interrupt, leaves no partial file behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from .files import temp_next_to

__all__ = ["convert", "quantize", "set_metadata", "describe", "print_info", "add_parsers", "converter_dir",
           "LMINF_KEYS", "OUTTYPES", "QUANTS"]

PathLike = Union[str, "os.PathLike[str]"]

# LM-Infinite defaults stored in a GGUF (read by models.lminf_defaults), all uint32, with their lower bounds
LMINF_KEYS = {"lminf.n_global": 0, "lminf.n_local": 1, "lminf.dist_max": 1}

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# --quant name -> llama_ftype name in llama.h
QUANTS = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
          "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}

_FLOAT_TYPES = {"F32", "F16", "BF16"}

# hub downloads: configs, tokenizers, chat templates and the weights (safetensors first, .bin only without them)
_HUB_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


# ---------------------------------------------------------------------------------------------------- helpers

def converter_dir() -> Path:
    """The llama.cpp tree holding convert_hf_to_gguf.py, conversion/ and gguf-py/ used by convert()."""
    here = Path(__file__).resolve().parent
    candidates = []
    if os.environ.get("LMINF_CONVERTER_DIR"):
        candidates.append(Path(os.environ["LMINF_CONVERTER_DIR"]))
    candidates += [here / "_convert", here.parent / "third_party" / "llama.cpp"]
    for c in candidates:
        if (c / "convert_hf_to_gguf.py").is_file() and (c / "conversion" / "__init__.py").is_file() \
                and (c / "gguf-py" / "gguf" / "__init__.py").is_file():
            return c
    raise FileNotFoundError(
        "llama.cpp's converter (convert_hf_to_gguf.py) not found in "
        + ", ".join(str(c) for c in candidates)
        + "; reinstall lminf_gguf (`pip install .` ships it in lminf_gguf/_convert) or set LMINF_CONVERTER_DIR")


def _gguf():
    """The gguf package: the installed one, else the copy shipped with the converter."""
    try:
        import gguf
    except ImportError:
        try:
            path = str(converter_dir() / "gguf-py")
        except FileNotFoundError:
            raise ImportError("the gguf package is needed: pip install gguf") from None
        sys.path.append(path)
        import gguf
    return gguf


def _check_lminf_values(values: Mapping[str, Any]) -> Dict[str, Optional[int]]:
    out = {}
    for key, value in values.items():
        if key not in LMINF_KEYS:
            raise ValueError(f"unknown LM-Infinite key {key!r} (known: {', '.join(LMINF_KEYS)})")
        if value is None:
            out[key] = None
            continue
        if isinstance(value, str) and value.strip().lstrip("+").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not LMINF_KEYS[key] <= value < 2 ** 32:
            raise ValueError(f"{key} must be an integer >= {LMINF_KEYS[key]}, not {value!r}")
        out[key] = int(value)
    return out


def _lminf_args(n_global, n_local, dist_max) -> Dict[str, int]:
    given = {"lminf.n_global": n_global, "lminf.n_local": n_local, "lminf.dist_max": dist_max}
    return {k: v for k, v in _check_lminf_values({k: v for k, v in given.items() if v is not None}).items()}


class _TempOutput:
    """A temporary file next to `out`, renamed over it by commit(), removed otherwise."""

    def __init__(self, out: Path, tag: str = ""):
        if out.is_dir():
            raise IsADirectoryError(f"cannot write {out}: it is a directory")
        parent = out.parent
        if not parent.exists():
            raise FileNotFoundError(f"cannot write {out}: directory {parent} does not exist")
        if not parent.is_dir():
            raise NotADirectoryError(f"cannot write {out}: {parent} is not a directory")
        try:
            name = temp_next_to(out, tag or "out")
        except OSError as e:
            raise OSError(f"cannot write {out}: {e.strerror or e}") from None
        self.out, self.path = out, Path(name)

    def commit(self) -> None:
        try:
            os.replace(self.path, self.out)
        except OSError as e:
            raise OSError(f"cannot write {self.out}: {e.strerror or e}") from None

    def discard(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------------------------- sources

def _resolve_source(src: PathLike) -> Path:
    """A local model directory, or a hub repo id fetched with huggingface_hub (honours HF_HUB_OFFLINE, the cache)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{src}: not a directory (give a Hugging Face model directory, a hub repo id, "
                         "or a float GGUF file with --quant)")
    text = str(src)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not text.startswith("."):
        return _snapshot(text)
    raise FileNotFoundError(f"{src}: no such model directory (nor a hub repo id of the form owner/name)")


def _snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"{repo_id}: fetching a hub model needs huggingface_hub (pip install huggingface-hub), "
                          "or give a local directory") from None
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS + ["*.safetensors"]))
        if not any(root.glob("*.safetensors")):
            root = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS + ["*.bin"]))
    except Exception as e:  # huggingface_hub raises its own classes (offline, not found, gated, network)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"{repo_id}: cannot fetch from the Hugging Face hub ({type(e).__name__}: {msg})"
                                ) from None
    return root


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    bad = f"{path}: corrupt or partial safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{bad} ({size} bytes, shorter than its header)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 1 << 28:
            raise ValueError(f"{bad} (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{bad} (unreadable header)") from None
    if 8 + n + end > size:
        raise ValueError(f"{bad} (its tensors need {8 + n + end} bytes, the file has {size}: truncated download?)")


def _check_model_dir(root: Path) -> str:
    """Validate a Hugging Face model directory before the converter sees it; return the architecture named."""
    cfg = root / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{root}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not archs or not isinstance(archs, list) or not isinstance(archs[0], str):
        raise ValueError(f"{cfg}: names no architecture (an 'architectures' list such as [\"LlamaForCausalLM\"])")

    st = sorted(root.glob("*.safetensors"))
    bins = sorted(p for p in root.glob("*.bin") if p.name.startswith(("pytorch_model", "model")))
    if not st and not bins:
        raise FileNotFoundError(f"{root}: no weights (*.safetensors or pytorch_model*.bin)")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = root / index_name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (ValueError, KeyError, AttributeError, TypeError):
                raise ValueError(f"{index}: unreadable index") from None
            missing = sorted(s for s in shards if not (root / s).is_file())
            if missing:
                raise FileNotFoundError(f"{root / missing[0]}: listed in {index_name} but missing (partial download?)")
    for p in st:
        _check_safetensors(p)
    for p in bins:
        if p.stat().st_size == 0:
            raise ValueError(f"{p}: empty weights file (partial download?)")
    return archs[0]


# ---------------------------------------------------------------------------------------------------- convert

# run in the subprocess: put the tree and its gguf-py first on the path, add the lminf.* keys to the header the
# converter writes, then run convert_hf_to_gguf.py as __main__ with the remaining arguments
_RUNNER = r"""
import json, os, runpy, sys
tree, keys = sys.argv[1], json.loads(sys.argv[2])
sys.path[:0] = [tree, os.path.join(tree, "gguf-py")]
import gguf
# Hugging Face's own class names of architectures the converter registers under their original authors' names
# (transformers' MptForCausalLM writes the tensors of MosaicML's MPTForCausalLM)
import conversion
from conversion import base
for alias, (module, cls) in {"MptForCausalLM": ("mpt", "MPTModel")}.items():
    if alias not in conversion.TEXT_MODEL_MAP:
        conversion.TEXT_MODEL_MAP[alias] = module
        base.ModelBase._model_classes[base.ModelType.TEXT][alias] = getattr(
            __import__("conversion." + module, fromlist=[cls]), cls)
pre = os.environ.get("LMINF_PRE_TOKENIZER")
if pre:
    # a BPE tokenizer the converter does not recognise (its hash of a test text is unknown): the given llama.cpp
    # pre-tokenizer name instead of an error
    _pre = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return _pre(self, tokenizer)
        except NotImplementedError:
            return pre
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
if keys:
    _write_header = gguf.GGUFWriter.write_header_to_file
    def write_header_to_file(self, *args, **kwargs):
        for key, value in keys.items():
            self.add_uint32(key, value)
        return _write_header(self, *args, **kwargs)
    gguf.GGUFWriter.write_header_to_file = write_header_to_file
script = os.path.join(tree, "convert_hf_to_gguf.py")
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def _converter_error(log: str, rc: int, src: Path, arch: str) -> Exception:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    m = re.search(r"Model (\S+) is not supported", log)
    if m:
        return ValueError(f"unknown architecture {m.group(1)} in {src / 'config.json'}: llama.cpp's converter "
                          "does not support it")
    if "BPE pre-tokenizer was not recognized" in log:
        return ValueError(f"llama.cpp's converter does not recognise the BPE pre-tokenizer of {src}: name the "
                          "closest llama.cpp one with --pre-tokenizer (e.g. llama-bpe, qwen2, gpt-2, bloom)")
    m = re.search(r"No module named '([^']+)'", log)
    if m:
        return ImportError(f"llama.cpp's converter needs the Python package {m.group(1).split('.')[0]!r}: pip install "
                           "torch transformers sentencepiece safetensors protobuf")
    errors = [ln.split(":", 2)[-1].strip() for ln in lines if ln.startswith("ERROR:")]
    tail = [ln for ln in lines if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", ln)]
    detail = (tail or errors or lines or [f"exit code {rc}"])[-1]
    return RuntimeError(f"llama.cpp's converter failed on {src} ({arch}): {detail[:400]}")


def _run_converter(src: Path, out: Path, outtype: str, keys: Dict[str, int], arch: str, verbose: bool,
                   pre_tokenizer: Optional[str] = None) -> None:
    tree = converter_dir()
    env = dict(os.environ)
    env.pop("LMINF_PRE_TOKENIZER", None)
    if pre_tokenizer:
        env["LMINF_PRE_TOKENIZER"] = pre_tokenizer
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "gguf-py")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("NO_LOCAL_GGUF", None)
    # everything is local by now: the converter must not reach the network
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    cmd = [sys.executable, "-c", _RUNNER, str(tree), json.dumps(keys), str(src), "--outfile", str(out),
           "--outtype", outtype]
    if verbose:
        rc, log = subprocess.call(cmd, env=env), ""
    else:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace")
        rc, log = proc.returncode, proc.stdout
    if rc != 0:
        raise _converter_error(log, rc, src, arch)
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"llama.cpp's converter wrote nothing for {src}")


def quantize(src: PathLike, out: PathLike, quant: str, *, metadata: Optional[Mapping[str, int]] = None,
             n_threads: Optional[int] = None, verbose: bool = False) -> str:
    """Quantise a float GGUF (f32/f16/bf16) with llama.cpp's llama_model_quantize; lminf.* keys in `metadata` are
    written into the output. Atomic like convert(). Returns the output path."""
    q = str(quant).upper()
    if q not in QUANTS:
        raise ValueError(f"unknown quantisation {quant!r} (choose from {', '.join(QUANTS)})")
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such GGUF file")
    info = describe(src)
    done = sorted(set(info["tensor_types"]) - _FLOAT_TYPES)
    if done:
        raise ValueError(f"{src} is already quantised ({', '.join(done)}): quantise from an f32, f16 or bf16 file")
    keys = _check_lminf_values(dict(metadata or {}))
    tmp = _TempOutput(out, "quant")
    try:
        _quantize_into(src, tmp.path, q, keys, n_threads, verbose)
        tmp.commit()
    finally:
        tmp.discard()
    return str(out)


def _quantize_into(src: Path, out: Path, quant: str, keys: Mapping[str, Optional[int]], n_threads, verbose) -> None:
    from . import _lib
    from ._lib import llama_raw

    params = llama_raw.llama_model_quantize_default_params()
    params.ftype = getattr(llama_raw, QUANTS[quant])
    params.nthread = int(n_threads or 0)  # 0: all cores
    keys = {k: v for k, v in keys.items() if v is not None}
    overrides = None
    if keys:
        # a C array closed by an empty key; integer overrides are written as uint32
        overrides = (llama_raw.llama_model_kv_override * (len(keys) + 1))()
        for o, (key, value) in zip(overrides, keys.items()):
            o.tag = llama_raw.LLAMA_KV_OVERRIDE_TYPE_INT
            o.key = key.encode()
            o.value.val_i64 = value
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_raw.llama_model_kv_override))
    with _lib.verbosity(verbose):
        rc = llama_raw.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed on {src} (code {rc}; verbose=True shows llama.cpp's log)")


def convert(src: PathLike, out: PathLike, outtype: str = "f16", quant: Optional[str] = None,
            n_global: Optional[int] = None, n_local: Optional[int] = None, dist_max: Optional[int] = None, *,
            n_threads: Optional[int] = None, verbose: bool = False, pre_tokenizer: Optional[str] = None) -> str:
    """Convert a Hugging Face model to GGUF; optionally quantise it and store LM-Infinite defaults.

    src: a local Hugging Face model directory (config.json + safetensors or .bin weights + tokenizer files), or
        a hub repo id "owner/name" (huggingface_hub.snapshot_download: the local cache, HF_HUB_OFFLINE, HF_TOKEN),
        or a float GGUF file (then only quantised: `quant` is required).
    outtype: the converter's output type, f32 | f16 | bf16 | q8_0 (the float type quantisation starts from).
    quant: None, or Q4_K_M | Q4_0 | Q5_K_M | Q8_0 through llama_model_quantize.
    n_global, n_local, dist_max: written as the uint32 keys lminf.n_global / lminf.n_local / lminf.dist_max.
    pre_tokenizer: llama.cpp's pre-tokenizer name to use when the converter does not recognise a BPE tokenizer
        (a fine-tune's edited tokenizer.json); by default such a tokenizer is an error, as upstream.
    Returns the output path. Errors raise FileNotFoundError / ValueError / OSError / RuntimeError with one line, and
    leave no output file (work happens in temporary files next to `out`, renamed at the end).
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    if quant is not None and str(quant).upper() not in QUANTS:
        raise ValueError(f"unknown quantisation {quant!r} (choose from {', '.join(QUANTS)})")
    if quant is not None and outtype == "q8_0":
        raise ValueError("--quant starts from a float file: use --outtype f32, f16 or bf16 with it")
    keys = _lminf_args(n_global, n_local, dist_max)
    out = Path(out).expanduser()

    if Path(src).expanduser().is_file() and str(src).endswith(".gguf"):
        if quant is None:
            raise ValueError(f"{src} is already a GGUF file: give --quant to quantise it, or use `lminf meta` "
                             "to set LM-Infinite keys")
        return quantize(Path(src).expanduser(), out, quant, metadata=keys, n_threads=n_threads, verbose=verbose)

    root = _resolve_source(src)
    arch = _check_model_dir(root)
    tmp = _TempOutput(out, "convert")
    mid = None
    try:
        if quant is None:
            _run_converter(root, tmp.path, outtype, keys, arch, verbose, pre_tokenizer)
        else:
            mid = _TempOutput(out, f"convert-{outtype}")
            _run_converter(root, mid.path, outtype, keys, arch, verbose, pre_tokenizer)
            _quantize_into(mid.path, tmp.path, str(quant).upper(), {}, n_threads, verbose)
        tmp.commit()
    finally:
        tmp.discard()
        if mid is not None:
            mid.discard()
    return str(out)


# ---------------------------------------------------------------------------------------------------- metadata

def set_metadata(path: PathLike, values: Mapping[str, Optional[int]]) -> Dict[str, Optional[int]]:
    """Write LM-Infinite defaults (lminf.n_global, lminf.n_local, lminf.dist_max; None removes a key) into a GGUF.

    GGUF keeps its key/value section before the tensor data, so the file is rewritten: every key and tensor is
    copied with gguf's GGUFReader/GGUFWriter into a temporary file next to it, which then replaces the original
    (atomic rename; the file's permissions are kept). Needs free disk space for one more copy of the model.
    Returns the lminf.* keys of the new file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    new = _check_lminf_values(values)
    if not new:
        raise ValueError("nothing to set: give at least one of " + ", ".join(LMINF_KEYS))
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None

    tmp = _TempOutput(path, "meta")
    try:
        writer = gguf.GGUFWriter(str(tmp.path), arch=arch, endianess=reader.endianess)
        for field in reader.fields.values():
            name = field.name
            if name == "general.architecture" or name.startswith("GGUF.") or name in new:
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            if name == "general.alignment":
                writer.data_alignment = int(field.contents())
            writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
        for key, value in new.items():
            if value is not None:
                writer.add_uint32(key, value)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.close()
        del reader
        try:
            os.chmod(tmp.path, path.stat().st_mode & 0o7777)
        except OSError:
            pass
        tmp.commit()
    finally:
        tmp.discard()
    return describe(path)["lminf"]


# ---------------------------------------------------------------------------------------------------- describe

# from the pinned llama.cpp (src/llama-arch.cpp, src/llama-model.cpp, src/models/*): the conditions under which
# llama_init_from_model_lminf refuses a model, read here from the GGUF keys alone
_RECURRENT = {"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"}
_HYBRID = {"jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h", "nemotron_h_moe",
           "qwen3next", "kimi-linear", "bailingmoe3", "kimi-k3", "glm5-next", "qwen35", "qwen35moe", "qwen4exp",
           "deepseek4", "minimax-01"}
_NO_ROPE = {"clip", "gpt2", "gptj", "mpt", "refact", "bloom", "jina-bert-v2", "t5", "t5encoder", "jais",
            "wavtokenizer-dec", "nemotron_h", "nemotron_h_moe", "kimi-linear", "kimi-k3", "glm5-next"}
# ALiBi (the distance is a per-head bias in the mask, where LM-Infinite's ceiling goes: patch 0012); bloom's bias is
# fixed by llama.cpp, mpt's is the file's attention.max_alibi_bias
_ALIBI = {"bloom", "mpt"}
# an architecture name the pinned llama.cpp knows but has no graph for: the file cannot run at all
_NO_GRAPH = {"gptj"}
_NON_CAUSAL = {"bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "eurobert", "jina-bert-v2",
               "t5encoder", "gemma-embedding", "dream", "llada", "llada-moe", "rnd1"}
# set sliding-window attention whatever the file says
_ALWAYS_SWA = {"gemma2", "gemma3n", "gemma4", "cohere2", "gpt-oss", "gemma-embedding"}
# interleaved sliding-window layers next to global ones (llama.cpp's iSWA cache): LM-Infinite goes on the global
# layers (patch 0013); the others with a window have it on every layer (bounded already) or another pattern
_ISWA = {"gemma2", "gemma3", "cohere2", "gpt-oss"}


def attention_kind(arch: str, kv: Dict[str, Any]) -> str:
    """The model's own position encoding and attention pattern, as `lminf info` reports it."""
    a = arch + "."
    if arch in _RECURRENT or arch in _HYBRID:
        return "recurrent" if arch in _RECURRENT else "hybrid recurrent/attention"
    if arch in _ALIBI and (arch == "bloom" or (kv.get(a + "attention.max_alibi_bias") or 0) > 0):
        kind = "ALiBi"
    elif arch in _NO_ROPE:
        kind = "no RoPE or ALiBi"
    elif a + "rope.dimension_sections" in kv:
        kind = "M-RoPE"
    else:
        kind = "RoPE"
    window = kv.get(a + "attention.sliding_window") or 0
    if arch in _ALWAYS_SWA or window > 0:
        pattern = kv.get(a + "attention.sliding_window_pattern")
        kind += f", interleaved sliding-window layers (window {window or '?'}" + \
            (f", pattern {pattern}" if pattern else "") + ")"
    return kind


def _support(arch: str, kv: Dict[str, Any], tensors=()) -> Optional[str]:
    """None if LM-Infinite supports the model, else the reason it is refused (tensors: the file's tensor names,
    where known)."""
    a = arch + "."
    if arch in _NO_GRAPH:
        return f"llama.cpp knows the name '{arch}' but has no graph for it: the file cannot run at all"
    if "position_embd.weight" in tensors:
        return "learned absolute position embeddings (rebasing positions would change them)"
    if arch in _RECURRENT or any(k.startswith((a + "ssm.", a + "wkv.", a + "shortconv.")) for k in kv):
        return "recurrent model (no KV cache to bound)"
    if arch in _HYBRID:
        return "hybrid recurrent/attention model"
    if arch in _NON_CAUSAL or kv.get(a + "attention.causal") is False:
        return "non-causal (bidirectional) attention"
    if arch in _ALIBI:
        if arch == "mpt" and not (kv.get(a + "attention.max_alibi_bias") or 0) > 0:
            return "no position encoding (an MPT file without ALiBi)"
    elif arch in _NO_ROPE:
        return "neither rotary position embedding (RoPE) nor ALiBi"
    if arch not in _ISWA and (arch in _ALWAYS_SWA or (kv.get(a + "attention.sliding_window") or 0) > 0):
        return "its sliding window is on every layer, or not interleaved with global layers as LM-Infinite needs"
    if a + "rope.dimension_sections" in kv:
        return "multi-section rotary embedding (M-RoPE)"
    if (kv.get(a + "attention.key_length_mla") or 0) > 0 or (kv.get(a + "attention.kv_lora_rank") or 0) > 0:
        return "multi-head latent attention (MLA)"
    return None


def _scalar(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


def describe(path: PathLike) -> Dict[str, Any]:
    """Summary of a GGUF file read with the gguf package only (no model load).

    Keys: path, architecture, name, file_type, context_length, embedding_length, block_count, head_count,
    head_count_kv, vocab_size, rope (the <arch>.rope.* keys, without the prefix), lminf (the lminf.* keys present),
    tensor_types ({type name: tensor count}), n_tensors, n_params, attention (the model's own position encoding and
    attention pattern: RoPE, ALiBi, interleaved sliding-window layers, ...), lminf_supported (bool) and lminf_reason
    (why not, else None).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None

    kv: Dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name.startswith("tokenizer.ggml.") and name != "tokenizer.ggml.model":
            continue
        try:
            kv[name] = _scalar(field.contents())
        except Exception:  # pragma: no cover - an unreadable value is left out
            continue
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    arch = kv.get("general.architecture") or "?"
    a = arch + "."
    types = Counter(t.tensor_type.name for t in reader.tensors)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    vocab = None
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            vocab = int(t.shape[-1])
    if vocab is None and tokens is not None:
        vocab = len(tokens.data)
    file_type = kv.get("general.file_type")
    if file_type is not None:
        try:
            file_type = gguf.LlamaFileType(int(file_type)).name.replace("MOSTLY_", "").replace("ALL_", "")
        except ValueError:
            pass
    reason = _support(arch, kv, {t.name for t in reader.tensors})
    if reason is None and not reader.tensors:
        reason = "the file has no tensors (a vocabulary-only GGUF): there is no model to run"
    return {
        "path": str(path),
        "architecture": arch,
        "name": kv.get("general.name"),
        "file_type": file_type,
        "context_length": kv.get(a + "context_length"),
        "embedding_length": kv.get(a + "embedding_length"),
        "block_count": kv.get(a + "block_count"),
        "head_count": kv.get(a + "attention.head_count"),
        "head_count_kv": kv.get(a + "attention.head_count_kv", kv.get(a + "attention.head_count")),
        "vocab_size": vocab,
        "rope": {k[len(a) + 5:]: v for k, v in kv.items() if k.startswith(a + "rope.")},
        "sliding_window": kv.get(a + "attention.sliding_window"),
        "attention": attention_kind(arch, kv),
        "lminf": {k: int(v) for k, v in kv.items() if k.startswith("lminf.")},
        "tensor_types": dict(sorted(types.items(), key=lambda kv_: -kv_[1])),
        "n_tensors": len(reader.tensors),
        "n_params": n_params,
        "lminf_supported": reason is None,
        "lminf_reason": reason,
    }


def print_info(path: Optional[PathLike] = None, file=None) -> None:
    """Print describe(path) for `lminf info` (path None: the default model)."""
    if path is None:
        from .models import default_model_path
        path = default_model_path()
    d = describe(path)
    out = file or sys.stdout
    rope = d["rope"]

    def line(label, value):
        print(f"{label + ':':18s}{value}", file=out)

    line("model", d["path"])
    line("architecture", d["architecture"] + (f" ({d['name']})" if d["name"] else ""))
    line("trained context", d["context_length"])
    line("layers", f"{d['block_count']}, embedding {d['embedding_length']}, heads {d['head_count']} "
                   f"(kv {d['head_count_kv']})")
    line("vocabulary", d["vocab_size"])
    if rope:
        line("rope", ", ".join(f"{k} = {v}" for k, v in rope.items()))
    line("attention", d["attention"])
    n_local = d["lminf"].get("lminf.n_local", d["context_length"])
    line("LM-Infinite keys", ", ".join(f"{k} = {v}" for k, v in d["lminf"].items()) or
         f"none (defaults: G = 10, L = C = {n_local})")
    line("tensors", f"{d['n_tensors']} ({d['n_params'] / 1e6:.2f} M parameters): "
                    + ", ".join(f"{k} {v}" for k, v in d["tensor_types"].items())
                    + (f"; file type {d['file_type']}" if d["file_type"] else ""))
    line("LM-Infinite", "supported" if d["lminf_supported"] else f"not supported: {d['lminf_reason']}")


# ---------------------------------------------------------------------------------------------------- CLI

def _cmd_convert(args) -> int:
    out = convert(args.src, args.outfile, outtype=args.outtype, quant=args.quant, n_global=args.n_global,
                  n_local=args.n_local, dist_max=args.dist_max, n_threads=args.threads, verbose=args.verbose,
                  pre_tokenizer=args.pre_tokenizer)
    d = describe(out)
    types = ", ".join(f"{k} {v}" for k, v in d["tensor_types"].items())
    print(f"wrote {out}: {d['architecture']}, {d['n_params'] / 1e6:.2f} M parameters ({types})")
    if not d["lminf_supported"]:
        print(f"note: LM-Infinite does not support this model ({d['lminf_reason']}); vanilla mode only",
              file=sys.stderr)
    return 0


def _parse_set(item: str):
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"--set needs KEY=VALUE, not {item!r}")
    key, value = key.strip(), value.strip()
    if key in ("n_global", "n_local", "dist_max"):
        key = "lminf." + key
    return key, (None if value.lower() in ("", "none") else value)


def _cmd_meta(args) -> int:
    if not args.set:
        print_info(args.model)
        return 0
    values = dict(_parse_set(item) for item in args.set)
    keys = set_metadata(args.model, values)
    print(f"{args.model}: " + (", ".join(f"{k} = {v}" for k, v in keys.items()) or "no lminf.* keys"))
    return 0


def add_parsers(subparsers) -> None:
    """Register `convert` and `meta` on an argparse subparsers object; each sets func(args) -> int."""
    c = subparsers.add_parser(
        "convert", help="convert a Hugging Face model to GGUF (optionally quantised, with LM-Infinite defaults)",
        description="Convert a Hugging Face model (local directory or hub repo id) to GGUF with llama.cpp's "
                    "convert_hf_to_gguf.py, optionally quantise it with llama_model_quantize, and store "
                    "LM-Infinite defaults (lminf.n_global / n_local / dist_max). SRC may also be a float GGUF "
                    "file to quantise. The output appears only when complete.")
    c.add_argument("src", metavar="SRC", help="Hugging Face model directory, hub repo id (owner/name), or a float "
                                              "GGUF with --quant")
    c.add_argument("-o", "--outfile", required=True, metavar="OUT.gguf", help="output GGUF path")
    c.add_argument("--outtype", default="f16", choices=OUTTYPES, help="converter output type (default f16)")
    c.add_argument("--quant", type=str.upper, choices=list(QUANTS), help="quantise with llama.cpp")
    c.add_argument("--n-global", type=int, metavar="G", help="store lminf.n_global (global/sink tokens)")
    c.add_argument("--n-local", type=int, metavar="L", help="store lminf.n_local (window)")
    c.add_argument("--dist-max", type=int, metavar="C", help="store lminf.dist_max (distance ceiling)")
    c.add_argument("-t", "--threads", type=int, help="quantisation threads (default: all cores)")
    c.add_argument("--pre-tokenizer", metavar="NAME",
                   help="llama.cpp pre-tokenizer for a BPE tokenizer the converter does not recognise (e.g. llama-bpe)")
    c.add_argument("--verbose", action="store_true", help="show the converter's and llama.cpp's log")
    c.set_defaults(func=_cmd_convert)

    m = subparsers.add_parser(
        "meta", help="show or set the LM-Infinite defaults stored in a GGUF",
        description="Set LM-Infinite defaults in a GGUF file (the file is rewritten: copied to a temporary file "
                    "next to it, then renamed over it). Without --set, print the file's summary.")
    m.add_argument("model", metavar="MODEL.gguf", help="GGUF file")
    m.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="lminf.n_global=G, lminf.n_local=L or lminf.dist_max=C (repeatable; VALUE none removes)")
    m.set_defaults(func=_cmd_meta)
