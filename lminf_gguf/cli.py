"""The `lminf` command line: llama.cpp-like flags over LMInfinite.

    lminf ask -f book.txt "Who wrote the letter?" -m qwen2.5-coder-0.5b   (a question about a file of any size;
                                                    lminf-topk by default: recall beyond the window)
    lminf chat -f book.txt -m qwen2.5-coder-0.5b   (the same, then a conversation about the file)
    lminf generate -p "Once upon a time" -n 64
    lminf generate -f book.txt -n 128 --n-local 4096
    lminf chat --n-local 2048            (a REPL on stdin; /reset, /save FILE, /load FILE, /quit)
    lminf info [MODEL]
    lminf perplexity -f book.txt --mode lminf shift      lminf passkey --mode lminf-topk lminf
    lminf convert HF_DIR -o model.gguf --quant Q4_K_M      lminf meta model.gguf --set lminf.n_local=4096
    lminf serve --port 8080 [--mode lminf-topk] [--parallel N]   (OpenAI-compatible, 127.0.0.1)
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from . import ask, convert, rpc, server
from . import __version__
from .errors import LMInfiniteError
from .options import (CHAT_TEMPERATURE, DEFAULT_MODE, FILE_MODE, FLASH_CHOICES, LLAMA_CPP_PYTHON, add_model_flags,
                      add_sampling_flags,
                      engine_kwargs, ignored_options, sampling_kwargs)


def open_engine(args, mode=None, n_ctx=None, flash_attn="args"):
    from .engine import LMInfinite
    if not getattr(args, "ignored_warned", False):  # once per command, however many sessions it opens
        for warning in ignored_options(args):
            sys.stderr.write(f"lminf: warning: {warning}\n")
        args.ignored_warned = True
    return LMInfinite(args.model, **engine_kwargs(args, mode, n_ctx, flash_attn))


class Progress:
    """A tqdm bar of tokens on stderr (the total estimated from the share of the input consumed), redrawn per
    batch on a terminal; elsewhere one summary line at the end."""

    def __init__(self, label: str):
        from tqdm import tqdm

        self.label, self.t0, self.done = label, time.perf_counter(), 0
        self.bar = tqdm(desc=label, unit="tok", total=None, file=sys.stderr, disable=not sys.stderr.isatty(),
                        dynamic_ncols=True, leave=True)

    def update_fraction(self, done: int, fraction) -> None:
        """done tokens, fraction of the input consumed (None: unknown)."""
        if fraction:
            self.bar.total = max(done, round(done / fraction))
        self.bar.update(done - self.done)
        self.done = done

    def finish(self) -> None:
        self.bar.close()
        if self.bar.disable and self.done:
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            sys.stderr.write(f"{self.label}: {self.done} tokens in {elapsed:.1f} s ({self.done / elapsed:.0f} "
                             "tokens/s)\n")
            sys.stderr.flush()


def cmd_generate(args) -> int:
    if args.file:
        source = Path(args.file)
        if not source.is_file():
            raise FileNotFoundError(f"prompt file not found: {args.file}")
    else:
        source = args.prompt
    if not source:
        raise ValueError("empty prompt: give -p TEXT or -f FILE with some text")
    llm = open_engine(args)
    progress = Progress("prompt")
    # the file is read and tokenised chunk by chunk (lminf_gguf.text), evaluated n_batch tokens at a time
    n = llm.feed(source, progress=progress.update_fraction)
    progress.finish()
    if n == 0:
        raise ValueError(f"empty prompt: {args.file} holds no text")
    for piece in llm.generate("", fresh=False, max_tokens=args.n_predict, stream=True, **sampling_kwargs(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


CHAT_HELP = """commands: /reset (forget the conversation; with -f, read the file again), /save FILE,
/load FILE (the conversation and its cache),
/quit (or end of input), /help. Ctrl-C during a reply stops that reply."""


def cmd_chat(args) -> int:
    from .engine import StateError
    from .cache import ContextFullError

    if args.file:
        ask.check_text_file(args.file)
        llm = ask.open_file_engine(args)
    else:
        args.mode = args.mode or DEFAULT_MODE
        llm = open_engine(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    # chat -f: the conversation over the file (ask.FileChat) keeps its own messages, the file in the first one
    over_file = ask.FileChat(llm, args.file, args.system, progress=Progress) if args.file else None
    if over_file:
        over_file.read()
    interactive = sys.stdin.isatty()
    generating = False

    def on_sigint(signum, frame):
        if generating:
            llm.cancel()          # stop this reply, keep the session
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    if interactive:
        about = f", {args.file}: {over_file.file_tokens} tokens" if over_file else ""
        sys.stderr.write(f"lminf chat ({llm.model_name}, {llm.mode}, G = {llm.n_global}, L = {llm.n_local}{about}). "
                         f"{CHAT_HELP}\n")
    try:
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                arg = arg.strip()
                try:
                    if cmd == "/quit":
                        break
                    elif cmd == "/reset":
                        llm.reset()
                        messages = list(system)
                        if over_file:
                            over_file = ask.FileChat(llm, over_file.path, args.system, progress=Progress)
                            over_file.read()
                        _note("conversation reset")
                    elif cmd == "/save":
                        if not arg:
                            raise ValueError("/save needs a file name")
                        extra = over_file.state() if over_file else {"messages": messages}
                        llm.save_state(arg, extra=extra)
                        _note(f"saved {len(extra['messages'])} messages to {arg}")
                    elif cmd == "/load":
                        if not arg:
                            raise ValueError("/load needs a file name")
                        extra = llm.load_state(arg)
                        messages = list(extra.get("messages") or [])
                        # a conversation over a file continues as one (without -f too); any other as a plain chat
                        over_file = ask.FileChat.restored(llm, extra, Progress) if "file_chat" in extra else None
                        _note(f"loaded {len(messages)} messages from {arg}")
                    elif cmd == "/help":
                        _note(CHAT_HELP)
                    else:
                        raise ValueError(f"unknown command {cmd} (try /help)")
                except (StateError, ValueError, OSError) as e:
                    sys.stderr.write(f"lminf: error: {e}\n")
                    sys.stderr.flush()
                continue
            messages.append({"role": "user", "content": line})
            reply, finish = "", None
            generating = True
            try:
                for piece, finish in _reply(llm, over_file, messages, args):
                    reply += piece
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except ContextFullError as e:
                messages.pop()
                sys.stderr.write(f"lminf: error: {e}; /reset to start again\n")
                continue
            finally:
                generating = False
            sys.stdout.write("\n")
            sys.stdout.flush()
            if finish == "cancelled" or (over_file and llm.seq.cancel.is_set()):
                _note("(reply stopped)")
            messages.append({"role": "assistant", "content": reply})
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def _reply(llm, over_file, messages, args):
    """(text piece, finish reason or None) of the reply to messages[-1]: through the chat API, or with -f the
    conversation over the file (ask.FileChat, which keeps its own copy of the messages)."""
    if over_file:
        for piece in over_file.ask(messages[-1]["content"], args.n_predict, **sampling_kwargs(args)):
            yield piece, None
        return
    for chunk in llm.create_chat_completion(messages, max_tokens=args.n_predict, stream=True, **sampling_kwargs(args)):
        choice = chunk["choices"][0]
        yield choice["delta"].get("content") or "", choice["finish_reason"]


def _note(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def cmd_perplexity(args) -> int:
    import numpy as np

    from . import evaluate
    from .cache import ContextFullError

    if not Path(args.file).is_file():
        raise FileNotFoundError(f"no such file: {args.file}")
    series = {}
    # one flash-attention setting for every mode, so that they differ only in their attention pattern: --flash-attn,
    # or under auto the choice llama.cpp made for the first mode (flash and non-flash round differently)
    flash = FLASH_CHOICES[args.flash_attn]
    for mode in args.mode:
        # vanilla holds every token: its context is the token budget (or the trained context)
        n_ctx = args.max_tokens + 1 if mode == "vanilla" and args.max_tokens else None
        llm = open_engine(args, mode, n_ctx, flash_attn=flash)
        if flash is None:
            flash = llm.cache_info()["flash_attn"]
        progress = Progress(mode)
        parts, n = [], 0
        try:
            for part in llm.iter_nll(path=args.file, progress=progress.update_fraction):
                parts.append(part)
                n += len(part)
                if args.max_tokens and n >= args.max_tokens - 1:
                    break
        except ContextFullError:
            _note(f"{mode}: stopped at its context size ({llm.cache_info()['cells_total']} cells)")
        progress.finish()
        nll = np.concatenate(parts)[: args.max_tokens - 1 if args.max_tokens else None]
        series[mode] = nll
        info = llm.cache_info()
        llm.close()
        print(f"{mode}: {len(nll) + 1} tokens, perplexity {np.exp(nll.mean()):.3f}, KV cells {info['cells_total']}, "
              f"flash attention {'on' if info['flash_attn'] else 'off'}")
        for r in evaluate.bucket_perplexity(nll):
            print(f"  positions [{r['lo']:>8d}, {r['hi']:>8d})  {r['tokens']:>8d} tokens  ppl {r['ppl']:10.3f}")
    if args.csv:
        evaluate.write_csv(args.csv, series)
    if args.plot:
        evaluate.plot_nll(args.plot, series, title=Path(args.file).name)
    return 0


def cmd_passkey(args) -> int:
    from . import evaluate

    if any(not 0 <= d <= 1 for d in args.depths):
        raise ValueError("--depths must lie in [0, 1]")
    tables = {}
    for mode in args.mode:
        n_ctx = max(args.lengths) + 64 if mode == "vanilla" else None
        llm = open_engine(args, mode, n_ctx)
        t0 = time.perf_counter()

        def report(n, d, case, answer, correct, mode=mode):
            print(f"{mode}: {n} tokens, depth {d:.2f}: key {case.key}, answer {answer.strip()[:40]!r} "
                  f"({'found' if correct else 'missed'}, {time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)

        table = evaluate.passkey_grid(llm, args.lengths, args.depths, trials=args.trials, seed=args.seed,
                                      on_case=report)
        llm.close()
        tables[mode] = table
        print(f"{mode}: accuracy by depth (rows) and prompt tokens (columns), {args.trials} trials each")
        print("  depth " + "".join(f"{n:>9d}" for n in args.lengths))
        for d in args.depths:
            print(f"  {d:5.2f} " + "".join(f"{table[(n, d)]:9.2f}" for n in args.lengths))
        if args.plot:
            stem = Path(args.plot)
            evaluate.plot_passkey(str(stem.with_name(f"{stem.stem}-{mode}{stem.suffix}")), table,
                                  title=f"passkey, {mode}")
    if args.csv:
        import csv
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["mode", "tokens", "depth", "accuracy", "trials"])
            for mode, table in tables.items():
                for (n, d), acc in sorted(table.items()):
                    w.writerow([mode, n, d, acc, args.trials])
    return 0


def cmd_info(args) -> int:
    from .convert import print_info
    from .models import resolve_model
    print_info(resolve_model(args.model))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lminf", description="LM-Infinite for GGUF models: unbounded inputs, "
                                 "bounded memory.")
    ap.add_argument("--version", action="version",
                    version=f"lminf {__version__} (llama.cpp of llama-cpp-python {LLAMA_CPP_PYTHON}, patched)")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt or a text file of any length")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text")
    src.add_argument("-f", "--file", help="read the prompt from a file (streamed: any size)")
    g.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    add_sampling_flags(g)
    add_model_flags(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat on stdin with the model's chat template; history of any length",
                       description="Chat REPL: one user message per line on stdin (a terminal or a pipe). "
                       + CHAT_HELP)
    c.add_argument("-s", "--system", help="system message")
    c.add_argument("-f", "--file", help="a text file (any size, streamed) as the context of the conversation: "
                   "the first message is a question about it")
    c.add_argument("-n", "--n-predict", type=int, default=256, help="most tokens per reply (default 256)")
    add_sampling_flags(c, CHAT_TEMPERATURE)
    add_model_flags(c, mode_default=None, mode_note=f" (default {DEFAULT_MODE}; with -f {FILE_MODE} where the "
                    "model supports it)")
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="architecture, context, rope, LM-Infinite settings and tensor types of a "
                       "GGUF file (read without loading the model)")
    i.add_argument("model", nargs="?", help="GGUF model path (default: the offline default model)")
    i.set_defaults(func=cmd_info)

    pp = sub.add_parser("perplexity", help="negative log-likelihood by position over a text of any length",
                        description="Perplexity per power-of-two position bucket, streamed at constant memory; "
                        "one run per --mode, a CSV and a plot of all of them.")
    pp.add_argument("-f", "--file", required=True, help="text file (streamed: any size)")
    pp.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens")
    pp.add_argument("--csv", help="write mode, bucket, tokens, mean NLL, perplexity rows here")
    pp.add_argument("--plot", help="write a PNG of NLL against position (log x axis) here")
    add_model_flags(pp, several_modes=True)
    pp.set_defaults(func=cmd_perplexity)

    pk = sub.add_parser("passkey", help="passkey retrieval accuracy over prompt lengths and depths",
                        description="A random 5-digit key hidden at a depth of filler text, asked for at the end "
                        "(greedy answer); seeded.")
    pk.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="prompt tokens")
    pk.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                    help="relative depth of the key (0 = start)")
    pk.add_argument("--trials", type=int, default=5, help="prompts per cell (default 5)")
    pk.add_argument("--seed", type=int, default=0)
    pk.add_argument("--csv", help="write mode, tokens, depth, accuracy rows here")
    pk.add_argument("--plot", help="heatmap PNG per mode (the mode is added to the file name)")
    add_model_flags(pk, several_modes=True)
    pk.set_defaults(func=cmd_passkey)

    ask.add_parser(sub)
    convert.add_parsers(sub)
    server.add_parser(sub)
    rpc.add_parser(sub)
    return ap



def _terminate(signum, frame):
    # SIGTERM as an exception: the temporary files of a write in progress are removed on the way out
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    except (LMInfiniteError, ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as e:
        sys.stderr.write(f"lminf: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
