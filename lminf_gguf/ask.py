"""Questions about a text file of any size: `lminf ask -f FILE "question"`, and the file that `lminf chat -f FILE`
starts its conversation with.

The file goes into the model's chat template as the context of the first user message ("<file text>\\n\\nQuestion:
<question>"), without being held in memory: the conversation is rendered with a marker where the file goes, the
template text before the marker is evaluated, then the file, streamed (lminf_gguf.text reads and tokenises it chunk
by chunk, with a progress bar), then the rest. Later turns render the whole conversation again, still with the
marker, and evaluate only what follows the text the session holds, so a chat over a book never reads the book twice.

The top-k middle tokens (options.FILE_MODE, "lminf-topk") are on by default here: they are what finds an answer
that lies many windows back, on RoPE, ALiBi and interleaved sliding-window models alike. A model or settings that
still refuse them (e.g. layers that share their KV, or a topk_layer above the last global layer: InvalidInputError
when the session is opened) fall back to "lminf" with a one-line note; --mode overrides both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, List, Optional

from .errors import InvalidInputError
from .options import (ASK_TEMPERATURE, DEFAULT_MODE, FILE_MODE, MODES, SESSION, add_model_flags, add_sampling_flags,
                      sampling_kwargs)

# where the file goes in the rendered conversation (never shown to the model: the text on each side of it is)
FILE_MARK = "@@LMINF-FILE-CONTEXT-7d1c@@"
# between the file and the first question, in the first user message
QUESTION_SEP = "\n\nQuestion: "
# bytes read to tell a text file from a binary one
_SNIFF_BYTES = 1 << 16


def check_text_file(path) -> Path:
    """The path of a readable, non-empty text file; FileNotFoundError / ValueError saying what is wrong."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"file not found: {path}")
    if not p.is_file():
        raise ValueError(f"not a regular file: {path}")
    with open(p, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if not head.strip():
        raise ValueError(f"{path} holds no text" if head else f"{path} is empty")
    if b"\x00" in head:
        raise ValueError(f"{path} looks like a binary file (it holds NUL bytes): give a text file")
    return p


class FileChat:
    """A conversation on one session whose first user message holds a text file (read into the session once).

    messages: the conversation as rendered, with FILE_MARK where the file goes; held: the rendered bytes (marker
    included) that the session's sequence stands for, or None before the file is read."""

    def __init__(self, llm, path, system: Optional[str] = None, progress=None):
        self.llm, self.path = llm, check_text_file(path)
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages: List[dict] = list(self.system)
        self.held: Optional[bytes] = None
        self.file_tokens = 0
        self.progress = progress  # progress factory: label -> object with update_fraction(done, fraction), finish()

    # -- reading the file --------------------------------------------------------------------------------------

    def _render(self, messages) -> bytes:
        from .responses import render_chat
        data = render_chat(self.llm, messages).encode("utf-8", errors="replace")
        mark = FILE_MARK.encode()
        if data.count(mark) != 1:
            raise InvalidInputError(f"the chat template of {self.llm.model_name} does not show a message's text "
                                    "verbatim: a file cannot be placed in it")
        return data

    def read(self) -> int:
        """Start the conversation afresh with the file as the context of the first user message: evaluate the
        template before it and the file (streamed); return the file's tokens."""
        return self._read(self._render(self.system + [self._first("?")]))

    def _first(self, question: str) -> dict:
        return {"role": "user", "content": FILE_MARK + QUESTION_SEP + question}

    def _read(self, data: bytes) -> int:
        from .responses import chat_format, content_spans, tokenize_chat
        llm = self.llm
        at = data.index(FILE_MARK.encode())
        spans = [(a, min(b, at)) for a, b in content_spans(data, self.system) if a < at]
        bos_text = chat_format(llm).bos_text
        add_bos = not (bos_text and data.startswith(bos_text.encode()))
        llm.reset()
        self.held = None
        llm.feed(tokenize_chat(llm, data[:at], 0, spans, add_bos) if at else [])
        progress = self.progress("file") if self.progress else None
        n = llm.feed(self.path, add_bos=add_bos and not at, progress=progress.update_fraction if progress else None)
        if progress:
            progress.finish()
        if n == 0:
            raise ValueError(f"{self.path} holds no text")
        self.file_tokens = n
        self.held = data[:at + len(FILE_MARK)]
        return n

    # -- turns -------------------------------------------------------------------------------------------------

    def ask(self, question: str, max_tokens: int, **sampling) -> Iterator[str]:
        """The reply to a user message, streamed: the first one is the question about the file. Only the new part
        of the conversation is evaluated (all of it, file included, if the template rewrote earlier turns)."""
        from .responses import chat_format, content_spans, fallback_template, tokenize_chat
        question = question.strip()
        if not question:
            raise InvalidInputError("empty question")
        llm = self.llm
        first = len(self.messages) == len(self.system)
        user = self._first(question) if first else {"role": "user", "content": question}
        messages = self.messages + [user]
        data = self._render(messages)
        if self.held is None or not data.startswith(self.held):
            if self.held is not None:
                _note("lminf: note: the chat template rewrote earlier turns: reading the file again")
            self._read(data)
        spans = content_spans(data, [{"content": QUESTION_SEP + question}] if first else messages)
        tokens = tokenize_chat(llm, data, len(self.held), spans, False)
        stops = [fallback_template(llm)[2]] if not chat_format(llm).from_gguf else []
        pieces = llm.generate(tokens, fresh=False, max_tokens=max_tokens, stream=True, stop=stops, **sampling)
        start, reply = llm.seq.cache.n_seen, ""
        try:
            for piece in pieces:
                reply += piece
                yield piece
        finally:
            pieces.close()
            self.messages = messages + [{"role": "assistant", "content": reply}]
            # the sequence holds the prompt and the reply as generated (up to a stop or a cancel); a prompt cut
            # short (cancelled, failed) leaves it holding part of a turn: the next turn reads the file again
            complete = llm.seq.cache.n_seen >= start + len(tokens)
            self.held = data + reply.encode("utf-8", errors="replace") if complete else None

    # -- state files ---------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """What a state file's extra holds to continue this conversation (with save_state)."""
        return {"messages": self.messages, "file_chat": {"file": str(self.path), "held": self.held.decode(
            "utf-8", errors="surrogateescape") if self.held is not None else None}}

    @classmethod
    def restored(cls, llm, extra: dict, progress=None) -> "FileChat":
        """The conversation of a state file written with state() (after llm.load_state)."""
        info = extra.get("file_chat")
        if not isinstance(info, dict) or not isinstance(info.get("held"), str) or \
                not isinstance(extra.get("messages"), list):
            raise ValueError("the state file holds no conversation over a file")
        chat = cls.__new__(cls)
        chat.llm, chat.path, chat.progress = llm, Path(info.get("file", "")), progress
        chat.messages = list(extra["messages"])
        chat.system = [m for m in chat.messages[:1] if isinstance(m, dict) and m.get("role") == "system"]
        chat.held = info["held"].encode("utf-8", errors="surrogateescape")
        chat.file_tokens = 0
        return chat


def _note(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def file_mode(args) -> None:
    """args.mode for a question about a file: --mode, else FILE_MODE; with lminf-topk and the default batch, a
    batch no larger than the window (lminf-topk needs n_ubatch <= n_local)."""
    if args.mode is None:
        args.mode = FILE_MODE
        args.mode_defaulted = True  # not --mode: open_file_engine may fall back
    if MODES[args.mode].topk and args.n_local and args.batch_size == SESSION.n_batch:
        args.batch_size = min(args.batch_size, args.n_local)


def open_file_engine(args):
    """The session for ask / chat -f: the mode of file_mode(args); where the model refuses the top-k middle
    tokens and --mode was not given, DEFAULT_MODE with a one-line note on stderr."""
    from .cli import open_engine
    file_mode(args)
    try:
        return open_engine(args)
    except InvalidInputError as e:
        if not getattr(args, "mode_defaulted", False) or not MODES[args.mode].topk:
            raise
        _note(f"lminf: note: {FILE_MODE} is not available here ({e}); using {DEFAULT_MODE}: no recall beyond "
              "the window")
        args.mode = DEFAULT_MODE
        return open_engine(args)


def cmd_ask(args) -> int:
    from .cli import Progress
    if not args.question.strip():
        raise ValueError("empty question: give the question after -f FILE")
    check_text_file(args.file)
    llm = open_file_engine(args)
    try:
        chat = FileChat(llm, args.file, args.system, progress=Progress)
        chat.read()
        for piece in chat.ask(args.question, args.n_predict, **sampling_kwargs(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    finally:
        llm.close()
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `lminf ask` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "ask", help="answer a question about a text file of any length (lminf-topk: recall beyond the window)",
        description="Read a text file of any size into the model's chat template as the context of a question "
                    "(streamed, with progress), then answer the question. The top-k middle tokens (lminf-topk) "
                    "are on unless --mode says otherwise, so an answer far behind the window is found. "
                    "`lminf chat -f FILE` asks several questions about one file.")
    p.add_argument("-f", "--file", required=True, help="text file (streamed: any size)")
    p.add_argument("question", help="the question about the file")
    p.add_argument("-s", "--system", help="system message")
    p.add_argument("-n", "--n-predict", type=int, default=256, help="most tokens of the answer (default 256)")
    add_sampling_flags(p, ASK_TEMPERATURE)
    add_model_flags(p, mode_default=None, mode_note=f" (default here: {FILE_MODE} where the model supports it, "
                    f"else {DEFAULT_MODE})")
    p.set_defaults(func=cmd_ask)
    return p


__all__ = ["FILE_MARK", "QUESTION_SEP", "FileChat", "check_text_file", "file_mode", "open_file_engine", "cmd_ask",
           "add_parser"]
