"""The `lminf` command line: llama.cpp-like flags over LMInfinite.

    lminf generate -p "Once upon a time" -n 64
    lminf generate -f book.txt -n 128 --n-local 4096
    lminf info [MODEL]
"""

from __future__ import annotations

import argparse
import sys
import time


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF model path (default: the offline SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--mode", default="lminf", choices=["lminf", "mask", "vanilla"],
                   help="attention: LM-Infinite (default), Λ-mask only, or unchanged llama.cpp")
    p.add_argument("--n-global", type=int, help="global (sink) tokens G (default: GGUF lminf.n_global, else 10)")
    p.add_argument("--n-local", type=int, help="window L (default: GGUF lminf.n_local, else trained context)")
    p.add_argument("--dist-max", type=int, help="distance ceiling C (default: GGUF lminf.dist_max, else L)")
    p.add_argument("-c", "--ctx-size", type=int, help="vanilla mode only: context size (default: trained)")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="tokens per llama_decode call")
    p.add_argument("-t", "--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0, help="layers to offload to the GPU")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def _open(args):
    from .engine import LMInfinite
    return LMInfinite(args.model, mode=args.mode, n_global=args.n_global, n_local=args.n_local,
                      dist_max=args.dist_max, n_ctx=args.ctx_size, n_batch=args.batch_size,
                      n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, verbose=args.verbose)


class _Progress:
    """One stderr line with tokens/s and ETA, redrawn per batch (only on a terminal)."""

    def __init__(self, label: str):
        self.label, self.t0 = label, time.perf_counter()
        self.enabled = sys.stderr.isatty()

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{self.label}: {done}/{total} tokens, {rate:.0f} tok/s, ETA {eta:.0f} s {end}")
        sys.stderr.flush()


def cmd_generate(args) -> int:
    if args.file:
        with open(args.file, "rb") as f:
            prompt = f.read().decode("utf-8", errors="replace")
    else:
        prompt = args.prompt
    if not prompt:
        raise ValueError("empty prompt: give -p TEXT or -f FILE with some text")
    llm = _open(args)
    progress = _Progress("prompt")
    pieces = llm.generate(prompt, max_tokens=args.n_predict, temperature=args.temp, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed,
                          stream=True, progress=progress.update)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_info(args) -> int:
    from .engine import LMInfinite
    with LMInfinite(args.model) as llm:
        md = llm.metadata
        arch = md.get("general.architecture", "?")
        print(f"model:           {llm.model_path}")
        print(f"architecture:    {arch}")
        print(f"trained context: {llm.n_ctx_train}")
        print(f"vocabulary:      {llm.n_vocab}")
        for key in ("rope.freq_base", "rope.scaling.type", "rope.scaling.factor"):
            if f"{arch}.{key}" in md:
                print(f"{key + ':':17s}{md[f'{arch}.{key}']}")
        print(f"LM-Infinite:     G = {llm.n_global}, L = {llm.n_local}, C = {llm.dist_max}"
              f" ({'from the file' if any(k.startswith('lminf.') for k in md) else 'defaults'})")
        info = llm.cache_info()
        print(f"KV cells:        {info['cells_total']} (bound G + L + n_ubatch = {info['cells_bound']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lminf", description="LM-Infinite for GGUF models: unbounded inputs, "
                                 "bounded memory.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt or a text file of any length")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text")
    src.add_argument("-f", "--file", help="read the prompt from a file")
    g.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temp", type=float, default=0.8, help="temperature, 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, help="sampling seed (default: random)")
    _model_flags(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="architecture, context and LM-Infinite settings of a model")
    i.add_argument("model", nargs="?", help="GGUF model path (default: the offline default model)")
    i.set_defaults(func=cmd_info)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as e:
        sys.stderr.write(f"lminf: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
