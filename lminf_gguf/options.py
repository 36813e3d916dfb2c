"""One home for every option list and default: attention modes, cache and store types, flash attention, sampling,
and the model flags that `lminf` subcommands and `lminf serve` share (so that cli and server do not import each
other). Engine, CLI and server read these; nothing here imports them."""

from __future__ import annotations

import argparse
import inspect
import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Optional

from .errors import InvalidInputError


@dataclass(frozen=True)
class Mode:
    """What an attention mode does: the table the engine consults instead of testing mode names."""
    name: str
    bounded: bool   # LM-Infinite cache: sinks + window, G + L + n_ubatch cells (else a plain n_ctx cache)
    ceiling: bool   # the distance ceiling (exact rebasing; else the window moves only for float32 precision)
    topk: bool      # top-k middle tokens from a store outside the cache
    shift: bool     # plain cache: llama.cpp's context shift when full (else ContextFullError)
    help: str


MODES = {m.name: m for m in (
    Mode("lminf", True, True, False, False, "LM-Infinite (default)"),
    Mode("lminf-topk", True, True, True, False, "LM-Infinite plus the top-k middle tokens"),
    Mode("mask", True, False, False, False, "Λ-mask only"),
    Mode("shift", False, False, False, True, "llama.cpp's context shift at the same KV budget"),
    Mode("vanilla", False, False, False, False, "unchanged llama.cpp"),
)}
DEFAULT_MODE = "lminf"
# `lminf ask -f` and `lminf chat -f`: questions about a file, whose answer may lie far behind the window; lminf-topk
# brings it back (DEFAULT_MODE, with a note, on a model that refuses it)
FILE_MODE = "lminf-topk"

# the llama-cpp-python release whose vendored llama.cpp the patches apply to (llama-cpp-python.pin)
LLAMA_CPP_PYTHON = "0.3.36"

# ggml type ids (enum ggml_type in ggml.h) of the KV cache and of the top-k store
KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "bf16": 30}
QUANTISED_KV_TYPES = {"q4_0": 32, "q8_0": 32}  # -> values per block: a head must hold whole blocks
STORE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}

# --flash-attn values -> LMInfinite(flash_attn=...)
FLASH_CHOICES = {"auto": None, "on": True, "off": False}


@dataclass(frozen=True)
class Range:
    """The values a number may take: low (inclusive; exclusive with low_open) to high (inclusive), None: unbounded;
    integer: only ints. check() is the one numeric check of the engine's arguments and the server's fields."""
    low: Optional[float] = None
    high: Optional[float] = None
    integer: bool = False
    low_open: bool = False

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"<= {self.high}" if self.high is not None else "finite"

    def check(self, name: str, value):
        """value as an int (integer) or a float; InvalidInputError naming `name` (its param) otherwise: a bool, a
        string, NaN, an infinity, an integer beyond any float, or a value outside the range."""
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (self.integer and not isinstance(value, int)):
            raise InvalidInputError(f"{name} must be {kind}, not {_shown(value)}", param=name)
        given = value
        if not self.integer:
            try:
                value = float(value)
            except OverflowError:  # an int beyond any float (10**400): out of every range
                value = math.inf
        if (not self.integer and not math.isfinite(value)) or \
                (self.low is not None and (value <= self.low if self.low_open else value < self.low)) or \
                (self.high is not None and value > self.high):
            kind = "an integer" if self.integer else "a finite number"
            raise InvalidInputError(f"{name} must be {kind} {self}, not {_shown(given)}", param=name)
        return value


def _shown(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python converts to text
        return "a very large integer"
    return text if len(text) <= 40 else text[:40] + "..."


def check_number(name: str, value, low=None, high=None, *, integer: bool = False, low_open: bool = False):
    """Range(low, high, integer, low_open).check(name, value)."""
    return Range(low, high, integer, low_open).check(name, value)


def _setting(default, low=None, high=None, *, integer=False, low_open=False, help: str, flag: Optional[str] = None):
    """A Sampling field: its default, its Range (metadata "range") and its help; flag: the CLI's option for it."""
    return field(default=default, metadata={"range": Range(low, high, integer, low_open), "help": help,
                                            "flag": flag})


@dataclass(frozen=True)
class Sampling:
    """The sampling settings, defined once: each field's default (llama-cpp-python's, except chat's lower
    temperature: CHAT_SAMPLING), its valid values (metadata "range") and its help. LMInfinite.generate,
    create_completion and create_chat_completion take these keywords (**sampling), the server's request fields
    of these names go through the same check, and the CLI's flags (add_sampling_flags) come from the fields that
    name a flag. Sampling(...) holds values as given (ban_eog's -inf biases included); Sampling.checked(...)
    checks them (InvalidInputError naming the first bad one). seed -1 (llama-server's) means random, as None."""
    temperature: float = _setting(0.8, 0.0, help="temperature, 0 = greedy", flag="--temp")
    # (at most an int32: llama.cpp's type, which ctypes would truncate silently)
    top_k: int = _setting(40, 0, 2**31 - 1, integer=True, help="top-k sampling, 0 = off", flag="--top-k")
    top_p: float = _setting(0.95, 0.0, 1.0, help="top-p (nucleus) sampling", flag="--top-p")
    min_p: float = _setting(0.05, 0.0, 1.0, help="min-p sampling", flag="--min-p")
    typical_p: float = _setting(1.0, 0.0, 1.0, help="locally typical sampling, 1 = off")
    repeat_penalty: float = _setting(1.0, 0.0, low_open=True, help="penalty of the last 64 tokens, 1 = off",
                                     flag="--repeat-penalty")
    frequency_penalty: float = _setting(0.0, -2.0, 2.0, help="OpenAI's frequency penalty (last 64 tokens)")
    presence_penalty: float = _setting(0.0, -2.0, 2.0, help="OpenAI's presence penalty (last 64 tokens)")
    seed: Optional[int] = _setting(None, -1, 2**32 - 1, integer=True, help="sampling seed, -1 = random",
                                   flag="--seed")
    # {token id: bias}: ids (ints, or strings of digits as JSON has them) checked against the vocabulary by the
    # session (generate.check_sampling); at most MAX_LOGIT_BIAS of them in a request to the server
    logit_bias: Optional[Dict[int, float]] = _setting(None, -100.0, 100.0, help="{token id: bias of its logit}")
    # a llama-cpp-python LlamaGrammar (grammar.py builds them), parsed by the session (generate.check_sampling)
    grammar: Any = field(default=None, metadata={"help": "a LlamaGrammar the reply must match"})

    @classmethod
    def checked(cls, base: Optional["Sampling"] = None, **given) -> "Sampling":
        """base (default SAMPLING) with the given settings, each checked (InvalidInputError names the first bad
        one; TypeError for a name that is not a setting)."""
        unknown = [name for name in given if name not in SAMPLING_FIELDS]
        if unknown:
            raise TypeError(f"unexpected sampling keyword argument {unknown[0]!r} (the settings: "
                            f"{', '.join(SAMPLING_FIELDS)})")
        return replace(base or SAMPLING, **{name: check_setting(name, value) for name, value in given.items()})

    def kwargs(self) -> dict:
        """The settings as keywords (generate.make_sampler's, create_*completion's)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def sampling_keywords(base: Sampling):
    """A decorator for a method that takes the Sampling settings as **sampling: its signature (help(), inspect)
    shows them as keyword arguments with base's defaults."""
    def decorate(func):
        sig = inspect.signature(func)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=getattr(base, f.name),
                                     annotation=f.type) for f in fields(Sampling)]
        func.__signature__ = sig.replace(parameters=params)
        return func
    return decorate


def check_setting(name: str, value):
    """One Sampling setting checked and normalised (numbers as float or int, seed -1 as None, logit_bias keys as
    ints); InvalidInputError naming it (param) otherwise."""
    spec = SAMPLING_FIELDS[name]
    if name == "grammar":
        return value
    if name == "seed":
        return None if value is None else (None if spec.check(name, value) == -1 else value)
    if name == "logit_bias":
        if value is None:
            return None
        if not isinstance(value, dict):
            raise InvalidInputError(f"logit_bias must map token ids to numbers, not {type(value).__name__}",
                                    param=name)
        bias = {}
        for key, v in value.items():
            try:
                tok = int(key)
                if isinstance(key, (bool, float)) or (isinstance(key, str) and not key.strip().lstrip("-").isdigit()):
                    raise ValueError
            except (TypeError, ValueError):
                raise InvalidInputError(f"logit_bias keys must be token ids, not {_shown(key)}", param=name) from None
            try:
                bias[tok] = spec.check(f"logit_bias[{key}]", v)
            except InvalidInputError as e:
                raise InvalidInputError(str(e), param=name) from None
        return bias
    return spec.check(name, value)


# name -> Range of each Sampling field (grammar: None, no range)
SAMPLING_FIELDS = {f.name: f.metadata.get("range") for f in fields(Sampling)}
SAMPLING = Sampling()


CHAT_TEMPERATURE = 0.2
# `lminf ask`: a question about a file has one answer, taken greedily
ASK_TEMPERATURE = 0.0
# OpenAI-shaped calls: choices per request (n; prompts x n for completions), alternatives per token (logprobs)
MAX_N = 16
MAX_LOGPROBS = 20
# token ids a server request may bias (logit_bias)
MAX_LOGIT_BIAS = 1024
# create_chat_completion's defaults (and the server's chat route's)
CHAT_SAMPLING = replace(SAMPLING, temperature=CHAT_TEMPERATURE)


# -- request options shared by the OpenAI-shaped calls and the server's request bodies (one check each) ----------

def check_n(n) -> int:
    """Choices per prompt: an integer in [1, MAX_N]."""
    return check_number("n", n, 1, MAX_N, integer=True)


def include_usage(stream, stream_options: Optional[dict]) -> bool:
    """OpenAI's stream_options ({"include_usage": bool}), only with stream true: whether a stream ends with a
    chunk of usage."""
    if stream_options is None:
        return False
    if not stream:
        raise InvalidInputError("stream_options is only allowed with stream true", param="stream_options")
    if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"} or \
            not isinstance(stream_options.get("include_usage", False), bool):
        raise InvalidInputError("stream_options must be {\"include_usage\": true|false}", param="stream_options")
    return stream_options.get("include_usage", False)


def check_return_progress(return_progress, stream) -> bool:
    """llama-server's return_progress: a bool, true only with stream true (the progress comes as stream chunks)."""
    if not isinstance(return_progress, bool):
        raise InvalidInputError("return_progress must be a boolean", param="return_progress")
    if return_progress and not stream:
        raise InvalidInputError("return_progress is only allowed with stream true (the progress comes as stream "
                                "chunks)", param="return_progress")
    return return_progress


def check_logprobs(logprobs) -> Optional[int]:
    """A completion's logprobs: None, or the alternatives per token, an integer in [0, MAX_LOGPROBS]."""
    return None if logprobs is None else check_number("logprobs", logprobs, 0, MAX_LOGPROBS, integer=True)


def check_chat_logprobs(logprobs, top_logprobs) -> Optional[int]:
    """A chat's logprobs (None or a bool) and top_logprobs (None or an integer in [0, MAX_LOGPROBS], only with
    logprobs true): None (no logprobs), else the alternatives per token."""
    if logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidInputError(f"logprobs must be true or false for chat, not {_shown(logprobs)}", param="logprobs")
    if top_logprobs is not None:
        check_number("top_logprobs", top_logprobs, 0, MAX_LOGPROBS, integer=True)
        if not logprobs:
            raise InvalidInputError("top_logprobs needs logprobs true", param="top_logprobs")
    return (top_logprobs or 0) if logprobs else None


@dataclass(frozen=True)
class TopK:
    """lminf-topk defaults, mirroring llama_lminf_topk_params (patches 0014-0015); the paper's k = 5 from layer 4."""
    k: int = 5
    layer_first: int = 4
    store_type: str = "f16"
    seg_rows: int = 4096      # rows of the first store segment
    block: int = 0            # block index: keys per block (0: exact scan)
    n_blocks: int = 8         # blocks scanned per segment
    n_units: int = 0          # of those, whole blocks attended in stream order (needs block > 0; 0: single keys)
    tail: int = 32            # a prompt's last tokens decoded one at a time, each picking its own middle tokens


TOPK = TopK()


@dataclass(frozen=True)
class Session:
    """Session defaults besides the LM-Infinite parameters (models.lminf_defaults) and the top-k ones."""
    n_batch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"


SESSION = Session()


def default_threads() -> int:
    """CPU threads when none are given: half the cores, as llama-cpp-python does. llama.cpp's threads spin-wait
    for each other, so one more thread than the cores left free by other work slows every token down 10-100x
    (measured: 32 tokens in 0.7 s with 1 thread, 17-21 s with 2, on a 2-core machine running something else)."""
    return max(1, (os.cpu_count() or 2) // 2)


def mode_help() -> str:
    return "attention: " + ", ".join(f"{m.name} = {m.help}" for m in MODES.values())


def add_model_flags(p: argparse.ArgumentParser, several_modes: bool = False, mode_default: Optional[str] = DEFAULT_MODE,
                    mode_note: str = "") -> None:
    """The flags that open a model and a session (LMInfinite's arguments). mode_default None: the command picks
    the mode (mode_note says how) unless --mode is given."""
    p.add_argument("-m", "--model", help="GGUF model: a path or hf:OWNER/REPO/FILE.gguf (Hugging Face cache "
                   "first; HF_HUB_OFFLINE=1 honoured); default: the offline SmolLM2-135M-Instruct Q4_1")
    if several_modes:
        p.add_argument("--mode", nargs="+", default=[DEFAULT_MODE], choices=list(MODES),
                       help=mode_help() + "; several modes run one after the other")
    else:
        p.add_argument("--mode", default=mode_default, choices=list(MODES), help=mode_help() + mode_note)
    p.add_argument("--n-global", type=int, help="global (sink) tokens G (default: GGUF lminf.n_global, else 10)")
    p.add_argument("--n-local", type=int, help="window L (default: GGUF lminf.n_local, else trained context)")
    p.add_argument("--dist-max", type=int, help="distance ceiling C (default: GGUF lminf.dist_max, else L)")
    p.add_argument("-c", "--ctx-size", type=int, help="vanilla mode only: context size (default: trained)")
    p.add_argument("--topk", type=int, default=TOPK.k, help=f"lminf-topk: middle tokens per KV head (default {TOPK.k})")
    p.add_argument("--topk-layer", type=int, default=TOPK.layer_first,
                   help=f"lminf-topk: first layer that picks them (default {TOPK.layer_first})")
    p.add_argument("--topk-dist", type=int, help="lminf-topk: distance they are attended at (default L/2)")
    p.add_argument("--topk-block", type=int, default=TOPK.block,
                   help="lminf-topk: block index with blocks of this many keys (default 0: exact scan)")
    p.add_argument("--topk-blocks", type=int, default=TOPK.n_blocks,
                   help=f"lminf-topk: blocks scanned per segment (default {TOPK.n_blocks})")
    p.add_argument("--topk-units", type=int, default=TOPK.n_units,
                   help="lminf-topk with --topk-block: attend this many of the scanned blocks whole, in stream order "
                        f"(memory units; default {TOPK.n_units}: single keys)")
    p.add_argument("--topk-tail", type=int, default=TOPK.tail,
                   help="lminf-topk: decode a prompt's last N tokens one at a time, so that each token of a question "
                        f"picks its own middle tokens (only a call's last token does; default {TOPK.tail})")
    p.add_argument("--store-type", default=TOPK.store_type, choices=list(STORE_TYPES),
                   help=f"lminf-topk: type of the middle-token store (default {TOPK.store_type})")
    p.add_argument("--store-dir", help="lminf-topk: keep the store in memory-mapped files in this directory")
    p.add_argument("-b", "--batch-size", type=int, default=SESSION.n_batch,
                   help=f"tokens per llama_decode call (default {SESSION.n_batch})")
    p.add_argument("-t", "--threads", type=int,
                   help=f"CPU threads (default: half the cores, here {default_threads()}; more than the cores other "
                        "work leaves free slows llama.cpp down many times)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0,
                   help="layers to offload to the GPU (or, with --rpc, to the RPC servers: default all)")
    p.add_argument("--rpc", metavar="HOST:PORT,...", dest="rpc_servers",
                   help="put the model's layers on these `lminf rpc-server`s (llama.cpp's RPC backend)")
    p.add_argument("--rpc-timeout", type=float, metavar="SECONDS",
                   help="with --rpc: fail a call when a server sends nothing for this long (default 120; 0: no bound)")
    p.add_argument("-fa", "--flash-attn", choices=list(FLASH_CHOICES), default="auto",
                   help="flash attention (default auto: on where the backend supports the mode)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def add_sampling_flags(p: argparse.ArgumentParser, temperature: float = SAMPLING.temperature) -> None:
    """The Sampling fields that name a flag, with their defaults, help and checks (a bad value: argparse's
    error naming the flag); temperature: the command's default."""
    for f in fields(Sampling):
        flag = f.metadata.get("flag")
        if flag is None:
            continue
        default = temperature if f.name == "temperature" else f.default
        shown = "random" if default is None else default
        p.add_argument(flag, dest=flag[2:].replace("-", "_"), type=_flag_type(f.name), default=default,
                       help=f"{f.metadata['help']} (default {shown})")


def _flag_type(name: str):
    spec = SAMPLING_FIELDS[name]

    def convert(text: str):
        try:
            value = int(text) if spec.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {'an integer' if spec.integer else 'a number'}, "
                                             f"not {text!r}") from None
        try:
            return check_setting(name, value)
        except InvalidInputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = "int" if spec.integer else "float"
    return convert


def sampling_kwargs(args) -> dict:
    """create_completion / generate keywords from add_sampling_flags' arguments."""
    return {f.name: getattr(args, f.metadata["flag"][2:].replace("-", "_")) for f in fields(Sampling)
            if f.metadata.get("flag")}


def ignored_options(args) -> list:
    """Warnings for flags given that the chosen mode(s) do not use (add_model_flags' arguments)."""
    modes = args.mode if isinstance(args.mode, list) else [args.mode]
    out = []
    if args.ctx_size is not None and "vanilla" not in modes:
        out.append("-c/--ctx-size is used in vanilla mode only: ignored (the cache is G + L + n_batch cells)")
    if args.dist_max is not None and not any(MODES[m].ceiling for m in modes):
        out.append("--dist-max is used with the distance ceiling only (lminf, lminf-topk): ignored")
    given = (("--topk", args.topk, TOPK.k), ("--topk-layer", args.topk_layer, TOPK.layer_first),
             ("--topk-dist", args.topk_dist, None), ("--topk-block", args.topk_block, TOPK.block),
             ("--topk-blocks", args.topk_blocks, TOPK.n_blocks), ("--topk-units", args.topk_units, TOPK.n_units),
             ("--topk-tail", args.topk_tail, TOPK.tail),
             ("--store-type", args.store_type, TOPK.store_type),
             ("--store-dir", args.store_dir, None))
    topk_flags = [flag for flag, value, default in given if value != default]
    if topk_flags and not any(MODES[m].topk for m in modes):
        out.append(f"{', '.join(topk_flags)}: used in lminf-topk mode only: ignored")
    return out


def engine_kwargs(args, mode: Optional[str] = None, n_ctx: Optional[int] = None, flash_attn="args") -> dict:
    """LMInfinite keywords (all but the model) from add_model_flags' arguments; flash_attn overrides --flash-attn."""
    flash = FLASH_CHOICES[getattr(args, "flash_attn", "auto")] if flash_attn == "args" else flash_attn
    return dict(mode=mode or args.mode, n_global=args.n_global, n_local=args.n_local, dist_max=args.dist_max,
                n_ctx=n_ctx or args.ctx_size, n_batch=args.batch_size, flash_attn=flash, n_threads=args.threads,
                n_gpu_layers=args.n_gpu_layers, rpc_servers=getattr(args, "rpc_servers", None),
                rpc_timeout=getattr(args, "rpc_timeout", None), verbose=args.verbose, topk=args.topk,
                topk_layer=args.topk_layer, topk_dist=args.topk_dist, topk_block=args.topk_block,
                topk_blocks=args.topk_blocks, topk_units=args.topk_units, topk_tail=args.topk_tail,
                store_type=args.store_type, store_dir=args.store_dir)


def check_session_args(*, mode, n_global, n_local, dist_max, n_batch, n_ubatch, n_ctx, type_k, type_v, topk,
                       topk_layer, topk_dist, store_type, store_dir, store_segment, topk_block, topk_blocks,
                       topk_units=0, topk_tail=0, flash_attn=None) -> None:
    """LMInfinite's arguments checked before anything is loaded: InvalidInputError names the first bad one."""
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    for name, value, low in (("n_global", n_global, 0), ("n_local", n_local, 1), ("dist_max", dist_max, 1),
                             ("n_batch", n_batch, 1), ("n_ubatch", n_ubatch, 1), ("n_ctx", n_ctx, 1),
                             ("topk", topk, 1), ("topk_layer", topk_layer, 0), ("topk_dist", topk_dist, 1),
                             ("store_segment", store_segment, 1), ("topk_block", topk_block, 0),
                             ("topk_blocks", topk_blocks, 1), ("topk_units", topk_units, 0),
                             ("topk_tail", topk_tail, 0)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise InvalidInputError(f"{name} must be an integer >= {low}, not {value!r}")
    if topk_units and not topk_block:
        raise InvalidInputError(f"topk_units={topk_units} attends whole blocks of the block index: it needs "
                                "topk_block > 0")
    for name, value in (("type_k", type_k), ("type_v", type_v)):
        if value not in KV_TYPES:
            raise InvalidInputError(f"{name} must be one of {', '.join(KV_TYPES)}, not {value!r}")
    if flash_attn is False and type_v in QUANTISED_KV_TYPES:
        # llama.cpp refuses the context (a NULL with only a log line): say why, before it is asked
        raise InvalidInputError(f"type_v={type_v!r} needs flash attention (llama.cpp keeps a quantised V cache only "
                                "there): use flash_attn=None or True, or an f16 V cache")
    if store_type not in STORE_TYPES:
        raise InvalidInputError(f"store_type must be one of {', '.join(STORE_TYPES)}, not {store_type!r}")
    if store_dir is not None and not os.path.isdir(store_dir):
        raise InvalidInputError(f"store_dir is not a directory: {store_dir}")


__all__ = ["Mode", "MODES", "DEFAULT_MODE", "LLAMA_CPP_PYTHON", "KV_TYPES", "QUANTISED_KV_TYPES", "STORE_TYPES",
           "FLASH_CHOICES", "FILE_MODE", "Range", "check_number", "Sampling", "SAMPLING", "SAMPLING_FIELDS",
           "check_setting", "sampling_keywords", "CHAT_TEMPERATURE", "CHAT_SAMPLING", "ASK_TEMPERATURE", "MAX_N",
           "MAX_LOGPROBS", "MAX_LOGIT_BIAS", "check_n", "include_usage", "check_return_progress", "check_logprobs",
           "check_chat_logprobs", "TopK", "TOPK", "Session", "SESSION", "default_threads", "add_model_flags",
           "add_sampling_flags", "sampling_kwargs", "engine_kwargs", "ignored_options", "check_session_args"]
