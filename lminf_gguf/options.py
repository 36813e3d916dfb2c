"""One home for every option list and default: attention modes, cache and store types, flash attention, sampling,
and the model flags that `lminf` subcommands and `lminf serve` share (so that cli and server do not import each
other). Engine, CLI and server read these; nothing here imports them."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Optional

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
class Sampling:
    """Sampling defaults (llama-cpp-python's, except chat's lower temperature)."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0    # locally typical sampling; 1 = off
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None


SAMPLING = Sampling()


def sampling_args(temperature, top_k, top_p, min_p, repeat_penalty, seed, frequency_penalty=0.0,
                  presence_penalty=0.0, logit_bias=None, grammar=None, typical_p=1.0) -> dict:
    """Sampling keywords checked (InvalidInputError names the first bad one; NaN and infinities included)."""
    def number(name, value, low, high=None, low_open=False, integer=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            raise InvalidInputError(f"{name} must be {'an integer' if integer else 'a number'}, not {value!r}")
        if not math.isfinite(value) or (value <= low if low_open else value < low) or \
                (high is not None and value > high):
            bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise InvalidInputError(f"{name} must be a finite number {bound}, not {value!r}")
        return value

    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise InvalidInputError(f"seed must be None or an integer in [0, 2^32), not {seed!r}")
    bias = None
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise InvalidInputError(f"logit_bias must map token ids to numbers, not {type(logit_bias).__name__}")
        bias = {}
        for key, value in logit_bias.items():
            try:
                tok = int(key)
                if isinstance(key, (bool, float)) or (isinstance(key, str) and not key.strip().lstrip("-").isdigit()):
                    raise ValueError
            except (TypeError, ValueError):
                raise InvalidInputError(f"logit_bias keys must be token ids, not {key!r}") from None
            bias[tok] = number(f"logit_bias[{key}]", value, -100.0, 100.0)
    return dict(temperature=number("temperature", temperature, 0.0), top_k=number("top_k", top_k, 0, integer=True),
                top_p=number("top_p", top_p, 0.0, 1.0), min_p=number("min_p", min_p, 0.0, 1.0),
                typical_p=number("typical_p", typical_p, 0.0, 1.0),
                repeat_penalty=number("repeat_penalty", repeat_penalty, 0.0, low_open=True),
                frequency_penalty=number("frequency_penalty", frequency_penalty, -2.0, 2.0),
                presence_penalty=number("presence_penalty", presence_penalty, -2.0, 2.0),
                logit_bias=bias, grammar=grammar, seed=seed)


CHAT_TEMPERATURE = 0.2
# `lminf ask`: a question about a file has one answer, taken greedily
ASK_TEMPERATURE = 0.0
# OpenAI-shaped calls: choices per request (n; prompts x n for completions), alternatives per token (logprobs)
MAX_N = 16
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class TopK:
    """lminf-topk defaults, mirroring llama_lminf_topk_params (patches 0005-0007); the paper's k = 5 from layer 4."""
    k: int = 5
    layer_first: int = 4
    store_type: str = "f16"
    seg_rows: int = 4096      # rows of the first store segment
    block: int = 0            # block index: keys per block (0: exact scan)
    n_blocks: int = 8         # blocks scanned per segment


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
    d = SAMPLING
    p.add_argument("--temp", type=float, default=temperature, help=f"temperature, 0 = greedy (default {temperature})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"top-k sampling, 0 = off (default {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"top-p (nucleus) sampling (default {d.top_p})")
    p.add_argument("--min-p", type=float, default=d.min_p, help=f"min-p sampling (default {d.min_p})")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty,
                   help=f"penalty of the last 64 tokens, 1 = off (default {d.repeat_penalty})")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")


def sampling_kwargs(args) -> dict:
    """create_completion / generate keywords from add_sampling_flags' arguments."""
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, seed=args.seed)


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
             ("--topk-blocks", args.topk_blocks, TOPK.n_blocks), ("--store-type", args.store_type, TOPK.store_type),
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
                rpc_timeout=getattr(args, "rpc_timeout", None), verbose=args.verbose, topk=args.topk, topk_layer=args.topk_layer,
                topk_dist=args.topk_dist, topk_block=args.topk_block, topk_blocks=args.topk_blocks,
                store_type=args.store_type, store_dir=args.store_dir)


def check_session_args(*, mode, n_global, n_local, dist_max, n_batch, n_ubatch, n_ctx, type_k, type_v, topk,
                       topk_layer, topk_dist, store_type, store_dir, store_segment, topk_block, topk_blocks,
                       flash_attn=None) -> None:
    """LMInfinite's arguments checked before anything is loaded: InvalidInputError names the first bad one."""
    if mode not in MODES:
        raise InvalidInputError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    for name, value, low in (("n_global", n_global, 0), ("n_local", n_local, 1), ("dist_max", dist_max, 1),
                             ("n_batch", n_batch, 1), ("n_ubatch", n_ubatch, 1), ("n_ctx", n_ctx, 1),
                             ("topk", topk, 1), ("topk_layer", topk_layer, 0), ("topk_dist", topk_dist, 1),
                             ("store_segment", store_segment, 1), ("topk_block", topk_block, 0),
                             ("topk_blocks", topk_blocks, 1)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise InvalidInputError(f"{name} must be an integer >= {low}, not {value!r}")
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
           "FLASH_CHOICES", "FILE_MODE", "Sampling", "SAMPLING", "CHAT_TEMPERATURE", "ASK_TEMPERATURE",
           "MAX_N", "MAX_LOGPROBS", "sampling_args", "TopK",
           "TOPK", "Session", "SESSION", "default_threads", "add_model_flags", "add_sampling_flags", "sampling_kwargs", "engine_kwargs",
           "ignored_options", "check_session_args"]
