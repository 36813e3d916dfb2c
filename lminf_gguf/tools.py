"""Tool calling through the model's own chat template, as llama-server --jinja does it.

- The request: `tools`, `tool_choice` and `parallel_tool_calls` checked (check_tools -> a ToolPlan), tool-call
  history in the messages checked (message_fields) and put in the form templates read (template_messages:
  arguments as objects, a tool result's function name filled in from the call it answers).
- The template: whether it can show tools at all (it references `tools`) and which call format it teaches
  (template_format): Qwen2.5 / Hermes `<tool_call>{json}</tool_call>`, Llama 3.x `{"name", "parameters"}`, or a
  generic JSON object for a template that takes tools in no format known here.
- The output: CallFilter splits a reply, as it streams, into content and tool calls in OpenAI's shape.
- tool_choice "required" or a named function constrains the reply with a grammar of the call format around the
  parameters' JSON schemas (call_grammar, through grammar.py).
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from typing import List, Optional, Tuple

from . import grammar
from .errors import InvalidInputError

TOOL_CHOICES = ("none", "auto", "required")
# fields of a message that reach the template as given (role and content are checked by the caller)
MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id", "reasoning_content")
# fields that clients echo back from a reply (the openai client's message objects): accepted when null or empty,
# refused by name otherwise (nothing in them can be shown to the model)
EMPTY_MESSAGE_FIELDS = ("refusal", "audio", "function_call", "annotations")
# OpenAI's rule for function names; also keeps them free of characters a grammar literal or JSON would escape
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ToolInputError(InvalidInputError):
    """A tool field or tool-call message the caller got wrong; param: the request field it is about."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# -- formats --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    """How a family writes tool calls: each call's JSON object between open and close, calls separated by sep
    (what the grammar of a forced call writes), the arguments under args_key."""
    name: str
    open: str
    close: str
    sep: str
    args_key: str


HERMES = Format("hermes", "<tool_call>\n", "\n</tool_call>", "\n", "arguments")      # Qwen2.5, Hermes
LLAMA3 = Format("llama3", "", "", "\n", "parameters")                                # Llama 3.1 - 3.3
GENERIC = Format("generic", "", "", "\n", "arguments")


@functools.lru_cache(maxsize=16)
def template_format(source: str) -> Optional[Format]:
    """The call format a chat template teaches, or None when it never references `tools` (cannot show them)."""
    if "tools" not in _template_variables(source):
        return None
    if "<tool_call>" in source:
        return HERMES
    if "<|python_tag|>" in source or ('"parameters"' in source and "ipython" in source):
        return LLAMA3
    return GENERIC


def _template_variables(source: str) -> frozenset:
    """The variables a Jinja2 template reads from its context (a word search when it does not parse here)."""
    import jinja2
    import jinja2.ext
    import jinja2.meta

    from ._lib import llama_cpp

    env = jinja2.Environment(extensions=[jinja2.ext.loopcontrols,
                                         llama_cpp.llama_chat_format.Jinja2ChatFormatter.IgnoreGenerationTags])
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))
    except Exception:  # noqa: BLE001 (a template this jinja2 cannot parse: the formatter falls back anyway)
        return frozenset(re.findall(r"\b[A-Za-z_]\w*\b", source))


def reads_tool_calls(source: str) -> bool:
    """Whether a chat template shows an assistant message's tool_calls (else they would vanish from the prompt)."""
    return "tool_calls" in source


# -- the request ----------------------------------------------------------------------------------------------

@dataclass
class ToolPlan:
    """What a request's tool fields ask for: the tools shown to the template (None: none, and the reply is not
    parsed), the functions a reply may call (names), which of them a grammar forces (forced: None when the reply
    is free), and whether several calls are allowed."""
    tools: Optional[list] = None
    names: Tuple[str, ...] = ()
    forced: Optional[list] = None
    parallel: bool = True
    fmt: Optional[Format] = None   # set by bind(): the template's call format
    grammar: object = None         # set by bind() when forced: the LlamaGrammar of the calls

    @property
    def active(self) -> bool:
        return self.tools is not None


def check_tools(tools, tool_choice=None, parallel_tool_calls=None) -> ToolPlan:
    """The ToolPlan of a request's tool fields; ToolInputError naming the field. Fields that ask for nothing are
    no-ops: no tools (None or []) with tool_choice "none", "auto" or "required" (llama-index sends "required"
    with no tools: there is nothing to require), tool_choice "none" (the tools are not shown and the reply is
    not parsed), parallel_tool_calls alone."""
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ToolInputError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    parallel = parallel_tool_calls is not False
    if tools is not None and not isinstance(tools, list):
        raise ToolInputError("'tools' must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    functions = [_function(t, i) for i, t in enumerate(tools or [])]
    names = [f["name"] for f in functions]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ToolInputError(f"tools: the function name {dup!r} is given twice", "tools")
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or set(choice) - {"type", "function"}:
            raise ToolInputError("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": "
                                 "\"function\", \"function\": {\"name\": ...}}", "tool_choice")
        if name not in names:
            raise ToolInputError(f"tool_choice names the function {name!r}, which is not among the tools "
                                 f"({', '.join(names) or 'none given'})", "tool_choice")
        forced = [functions[names.index(name)]]
    elif choice in TOOL_CHOICES:
        forced = functions if choice == "required" else None
    else:
        raise ToolInputError(f"'tool_choice' must be one of {', '.join(TOOL_CHOICES)} or a named function, not "
                             f"{json.dumps(choice)[:40]}", "tool_choice")
    if not functions or choice == "none":
        return ToolPlan(parallel=parallel)
    return ToolPlan(tools=[{"type": "function", "function": f} for f in functions], names=tuple(names),
                    forced=forced, parallel=parallel)


def bind(plan: ToolPlan, label: str, source: str) -> ToolPlan:
    """plan for the chat template `source` (label: how to name it): its call format, and the grammar of a forced
    call; ToolInputError when the template cannot show tools."""
    if not plan.active:
        return plan
    fmt = template_format(source)
    if fmt is None:
        raise ToolInputError(f"tools: {label} never references 'tools', so it cannot show them to the model "
                             "(this model does not take tools; tool_choice \"none\" sends none)", "tools")
    plan.fmt = fmt
    if plan.forced:
        plan.grammar = call_grammar(fmt, plan)
    return plan


def _function(tool, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
            not isinstance(tool.get("function"), dict):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise ToolInputError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}" +
                             (f" (type {kind!r} is not supported)" if kind not in (None, "function") else ""),
                             "tools")
    fn = tool["function"]
    unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise ToolInputError(f"{where}.function: unsupported field {unknown[0]!r}", "tools")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ToolInputError(f"{where}.function.name must be 1-64 letters, digits, '_', '.' or '-', not "
                             f"{json.dumps(name)[:40]}", "tools")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise ToolInputError(f"{where}.function.description must be a string", "tools")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise ToolInputError(f"{where}.function.parameters must be a JSON schema object", "tools")
    out = {k: v for k, v in fn.items() if v is not None}
    out["parameters"] = params or {"type": "object", "properties": {}}   # OpenAI: omitted = no parameters
    return out


def message_fields(message: dict, i: int) -> dict:
    """The fields of message i other than role and content that the template can use (MESSAGE_FIELDS), checked;
    ToolInputError naming any other field that carries something."""
    out = {}
    for key, value in message.items():
        if key in ("role", "content"):
            continue
        where = f"messages[{i}].{key}"
        if key in EMPTY_MESSAGE_FIELDS:
            if value not in (None, [], {}, ""):
                raise ToolInputError(f"{where} cannot be shown to the model (only null or empty is accepted)",
                                     where)
        elif key not in MESSAGE_FIELDS:
            raise ToolInputError(f"{where}: unsupported message field (a message has role, content, "
                                 f"{', '.join(MESSAGE_FIELDS)})", where)
        elif value is None:
            continue
        elif key == "tool_calls":
            if message.get("role") != "assistant":
                raise ToolInputError(f"{where}: only assistant messages carry tool calls", where)
            out[key] = [_history_call(c, f"{where}[{k}]") for k, c in enumerate(_list(value, where))]
        elif not isinstance(value, str):
            raise ToolInputError(f"{where} must be a string", where)
        else:
            out[key] = value
    return out


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise ToolInputError(f"{where} must be a list", where)
    return value


def _history_call(call, where: str) -> dict:
    """A tool call of the history in OpenAI's shape, checked (arguments a JSON text, or an object)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or call.get("type", "function") != "function" or \
            not isinstance(fn.get("name"), str):
        raise ToolInputError(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                             f"\"arguments\"}}}}", where)
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            json.loads(args or "{}")
        except ValueError:
            raise ToolInputError(f"{where}.function.arguments is not JSON", where) from None
    elif args is not None and not isinstance(args, dict):
        raise ToolInputError(f"{where}.function.arguments must be a JSON text", where)
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args if args is not None else "{}"}}
    if call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def template_messages(messages: List[dict]) -> List[dict]:
    """The messages as chat templates read them (Hugging Face's convention, which llama-server follows too):
    tool-call arguments as objects, not JSON text (templates write them with `| tojson`), an assistant turn of
    calls with content "" (templates concatenate content), and a tool result's `name` taken from the call it
    answers when missing. Other fields pass as they are; the tool calls are checked."""
    out, names = [], {}
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("tool_calls") is not None:
            calls = []
            for k, c in enumerate(_list(m["tool_calls"], f"messages[{i}].tool_calls")):
                c = _history_call(c, f"messages[{i}].tool_calls[{k}]")
                args = c["function"]["arguments"]
                args = json.loads(args or "{}") if isinstance(args, str) else args
                calls.append(dict(c, function={"name": c["function"]["name"], "arguments": args}))
                names[c.get("id")] = c["function"]["name"]
            m = dict(m, tool_calls=calls, content=m.get("content") or "")
        elif isinstance(m, dict) and m.get("role") == "tool" and m.get("name") is None and \
                m.get("tool_call_id") in names:
            m = dict(m, name=names[m["tool_call_id"]])
        out.append(m)
    return out


# -- the grammar of a forced call -----------------------------------------------------------------------------

def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_WORD = re.compile(r"[A-Za-z0-9_-]+")


def prefix_rules(text: str, prefix: str) -> str:
    """GBNF text with every rule name prefixed (definitions and references; literals, character classes,
    repeat counts and comments untouched), so that several converted schemas live in one grammar."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"[{":
            close = {'"': '"', "[": "]", "{": "}"}[c]
            j = i + 1
            while j < n and text[j] != close:
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        elif c == "#":
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(text[i:j])
            i = j
        elif _WORD.match(text, i):
            m = _WORD.match(text, i)
            out.append(prefix + m.group())
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def call_grammar(fmt: Format, plan: ToolPlan):
    """The LlamaGrammar of call_gbnf (bounded by grammar.py)."""
    return grammar.from_gbnf(call_gbnf(fmt, plan), "tools")


def call_gbnf(fmt: Format, plan: ToolPlan) -> str:
    """GBNF of a reply that is nothing but calls to plan.forced (one, or several when parallel), each written as
    fmt writes it: {"name": NAME, ARGS_KEY: arguments matching the function's parameters}."""
    rules, alternatives = [], []
    for fn in plan.forced:
        k = plan.names.index(fn["name"])
        body = grammar.schema_gbnf(fn["parameters"], f"tools[{k}].function.parameters")
        rules.append(prefix_rules(body, f"t{k}-"))
        head = _literal('{"name": "' + fn["name"] + '", "' + fmt.args_key + '": ')
        rules.append(f't{k}-call ::= {head} t{k}-root "}}"')
        alternatives.append(f"t{k}-call")
    call = f"{_literal(fmt.open) + ' ' if fmt.open else ''}({' | '.join(alternatives)})" \
           f"{' ' + _literal(fmt.close) if fmt.close else ''}"
    more = f" ({_literal(fmt.sep)} call)*" if plan.parallel else ""
    return "\n".join([f"root ::= call{more}", f"call ::= {call}", *rules]) + "\n"


# -- the output -----------------------------------------------------------------------------------------------

def new_call(name: str, arguments) -> dict:
    """A tool call in OpenAI's shape (arguments as JSON text)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _call_of(obj, fmt: Format, names) -> Optional[dict]:
    """A parsed call object ({"name", "arguments" | "parameters"}, or OpenAI's {"type", "function"}) as a call to
    one of names; None when it is not one."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get(fmt.args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(name, str) or name not in names or not isinstance(args, dict) or \
            set(obj) - {"name", "arguments", "parameters", "type", "id"}:
        return None
    return new_call(name, args)


_PYTHON_TAG = "<|python_tag|>"
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_json_calls(text: str, fmt: Format, names) -> Optional[list]:
    """The calls of a reply that is nothing but JSON calls (Llama 3.x, generic): one object, several separated by
    whitespace, ';' or ',', a list of them, or {"tool_calls": [...]} / {"tool_call": {...}} (llama.cpp's generic
    form), optionally in a ``` fence; None when the reply is anything else."""
    text = text.strip()
    m = _FENCE.match(text)
    text = (m.group(1) if m else text).removeprefix(_PYTHON_TAG).strip()
    decoder, at, objs = json.JSONDecoder(), 0, []
    while at < len(text):
        try:
            obj, at = decoder.raw_decode(text, at)
        except ValueError:
            return None
        objs += obj if isinstance(obj, list) else [obj]
        while at < len(text) and text[at] in " \t\r\n;,":
            at += 1
    if len(objs) == 1 and isinstance(objs[0], dict) and set(objs[0]) in ({"tool_calls"}, {"tool_call"}):
        inner = objs[0].get("tool_calls", objs[0].get("tool_call"))
        objs = inner if isinstance(inner, list) else [inner]
    calls = [_call_of(o, fmt, names) for o in objs]
    return calls if calls and all(calls) else None


class CallFilter:
    """A reply, fed piece by piece, split into content to show now and tool calls: feed() and close() return
    events ("content", text) and ("call", call dict). A reply that opens with JSON ('{', '[', a ``` fence, Llama's
    <|python_tag|>) is read whole as calls (parse_json_calls: models of every family also write bare calls);
    otherwise Hermes' <tool_call> blocks are calls and the rest content (other formats: all content).
    Whitespace alone is held back (a reply of calls has no content); at most one call unless parallel; a call
    that does not parse, or names no offered function, stays content. The whole reply through one filter gives
    what its stream gives."""

    def __init__(self, fmt: Format, names, parallel: bool):
        self.fmt, self.names, self.parallel = fmt, tuple(names), parallel
        self.buf = ""          # text not yet decided on
        self.space = ""        # whitespace held back
        self.calls = 0
        self.json = None       # None: undecided (only whitespace so far); True: JSON read whole at the end

    def feed(self, text: str) -> list:
        self.buf += text
        return self._step(False)

    def close(self) -> list:
        events = self._step(True)
        if not self.calls and self.space:
            events.append(("content", self.space))
        self.space = ""
        return events

    def _step(self, final: bool) -> list:
        events: list = []
        if self.json is None:
            head = self.buf.lstrip()
            if not final and _PYTHON_TAG.startswith(head):
                return events   # only whitespace, or what may become Llama's tag: undecided
            self.json = head[:1] in ("{", "[", "`") or head.startswith(_PYTHON_TAG)
        if self.json:
            if final:
                calls = parse_json_calls(self.buf, self.fmt, self.names)
                for call in calls or []:
                    self._call(call, events)
                if calls is None:
                    self._content(self.buf, events)
                self.buf = ""
        elif self.fmt is HERMES:
            self._hermes(final, events)
        else:
            self._content(self.buf, events)
            self.buf = ""
        return events

    def _content(self, text: str, events: list) -> None:
        # trailing whitespace waits for what follows (dropped before a call), however the pieces were cut
        body = text.rstrip()
        if body:
            events.append(("content", self.space + body))
            self.space = ""
        self.space += text[len(body):]

    def _call(self, call: dict, events: list) -> None:
        if self.calls and not self.parallel:
            return  # parallel_tool_calls false: the first call only
        self.calls += 1
        self.space = ""
        events.append(("call", call))

    def _hermes(self, final: bool, events: list) -> None:
        tag, end = "<tool_call>", "</tool_call>"
        while self.buf:
            at = self.buf.find(tag)
            if at < 0:
                # hold back a tail that may be the start of the tag
                keep = 0 if final else next((k for k in range(min(len(tag) - 1, len(self.buf)), 0, -1)
                                             if tag.startswith(self.buf[-k:])), 0)
                self._content(self.buf[:len(self.buf) - keep], events)
                self.buf = self.buf[len(self.buf) - keep:]
                return
            self._content(self.buf[:at], events)
            self.buf = self.buf[at:]
            stop = self.buf.find(end)
            if stop < 0 and not final:
                return
            whole = self.buf[:stop + len(end)] if stop >= 0 else self.buf
            self.buf = self.buf[len(whole):]
            calls = parse_json_calls(whole[len(tag):len(whole) - len(end) * (stop >= 0)], self.fmt, self.names)
            if calls is None or len(calls) != 1:
                self._content(whole, events)
            else:
                self._call(calls[0], events)


def split_reply(text: str, fmt: Format, names, parallel: bool) -> Tuple[Optional[str], list]:
    """(content, calls) of a whole reply: content None when the reply is calls only."""
    f = CallFilter(fmt, names, parallel)
    events = f.feed(text) + f.close()
    content = "".join(t for kind, t in events if kind == "content")
    calls = [t for kind, t in events if kind == "call"]
    return (content or None) if calls else content, calls
