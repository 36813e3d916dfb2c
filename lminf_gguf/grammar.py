"""Every grammar the product builds or accepts, bounded before llama.cpp sees it.

llama.cpp's GBNF parser is recursive (one pair of frames per nested group, one frame per rule of a leftmost rule
chain in its left-recursion check) and llama-cpp-python's JSON-schema converter unrolls counts into text, so a
150-byte request could once overflow a thread's stack (a pattern `a{,1000000}`: 10^6 nested groups) or ask for a
10^9-character literal. The defence is a size and depth check before the recursive parse, at two levels:

- the schema, before the converter runs: node count, nesting, the count keywords, enum/anyOf/oneOf sizes, and
  each regex `pattern`'s expanded size (every repeat syntax the converter reads: `{N}`, `{N,}`, `{,M}`, `{N,M}`,
  `*`, `+`, `?`; only ASCII digits, where Python's int() would also take `1_000` or non-ASCII digits);
- the GBNF text, whatever its source (a schema, a tool, a grammar given directly): its size, its rule count and
  its group nesting, which bound the parser's recursion to a known number of frames.

A check, not a parse in a thread with a large stack: Python cannot catch a native stack overflow, so a bigger
stack only moves the limit, while the checks bound the depth the parser can reach (tests/test_grammar.py parses
a grammar at the bounds in a thread with a 1 MiB stack; 4000 nested groups overflow it, so the margin is about 4x,
and Python's threads get 8 MiB). Over a bound: InvalidInputError naming it (a 400).
"""

from __future__ import annotations

import json
import re

from ._lib import llama_cpp
from .errors import InvalidInputError

# the schema: the converter unrolls counts ({"minLength": 10**9} used to build a grammar of 10^9 rules)
MAX_SCHEMA_COUNT = 1000      # minLength/maxLength/minItems/..., and each regex repeat
MAX_SCHEMA_NODES = 10000     # values in the schema
MAX_SCHEMA_DEPTH = 64        # nesting of the schema's objects and lists
MAX_PATTERN_SIZE = 20000     # a regex pattern's expanded size (its repeats multiplied out)
# alternatives of one enum / anyOf / oneOf: each is a grammar stack that every sampled token is checked against
# (3,000 made one 4-token reply take 11 s, found by scripts/fuzz_grammar.py)
MAX_SCHEMA_CHOICES = 512
# the GBNF text: bounds of llama.cpp's recursive parse (a frame pair per group level, a frame per rule of a chain)
MAX_GBNF_BYTES = 1 << 20
MAX_GBNF_RULES = 4096
MAX_GBNF_DEPTH = 1024     # the converter nests one group per optional repeat: maxLength 1000 is ~1000 deep

_COUNT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_DIGITS = re.compile(r"[0-9]+")   # ASCII only: str.isdigit() and int() accept other scripts' digits
_RULE = re.compile(r"^[ \t]*[a-zA-Z0-9_-]+[ \t]*::=", re.MULTILINE)


def check_schema(schema, where: str) -> None:
    """InvalidInputError when a JSON schema's grammar would be unbounded in practice (see the module doc)."""
    nodes = 0
    stack = [(schema, 0)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise InvalidInputError(f"{where}: the JSON schema has more than {MAX_SCHEMA_NODES} values")
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidInputError(f"{where}: the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, dict):
            for key in _COUNT_KEYS:
                value = node.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
                        value <= MAX_SCHEMA_COUNT):   # NaN too
                    raise InvalidInputError(f"{where}: {key} {value} is above {MAX_SCHEMA_COUNT}")
            if isinstance(node.get("pattern"), str):
                pattern_size(node["pattern"], where)
            for key in ("enum", "anyOf", "oneOf"):
                if isinstance(node.get(key), list) and len(node[key]) > MAX_SCHEMA_CHOICES:
                    raise InvalidInputError(f"{where}: {key} has {len(node[key])} alternatives, more than "
                                            f"{MAX_SCHEMA_CHOICES}")
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _repeat_bounds(body: str, pattern: str, where: str):
    """(min, max or None) of a `{...}` repeat as the converter reads it, with ASCII digits only."""
    parts = [p.strip() for p in body.split(",")]
    if len(parts) > 2 or not all(p == "" or _DIGITS.fullmatch(p) for p in parts) or parts[0] == "" == parts[-1]:
        raise InvalidInputError(f"{where}: pattern repeat {{{body}}} is not {{N}}, {{N,}}, {{,M}} or {{N,M}} "
                                f"with ASCII digits (in /{pattern[:80]}/)")
    if any(p and (len(p) > 6 or int(p) > MAX_SCHEMA_COUNT) for p in parts):
        raise InvalidInputError(f"{where}: a pattern repeat above {MAX_SCHEMA_COUNT} (in /{pattern[:80]}/)")
    low = int(parts[0]) if parts[0] else 0
    high = (int(parts[-1]) if parts[-1] else None) if len(parts) == 2 else low
    return low, high


def pattern_size(pattern: str, where: str = "pattern") -> int:
    """The expanded size of a regex pattern, in the converter's terms: each item counts 1 (a character, a class,
    an escape), a group the sum of its items, a repeat multiplies its item by its largest count (its minimum when
    unbounded, plus one). InvalidInputError above MAX_PATTERN_SIZE or on a repeat the converter would misread."""
    sizes = [[0, 0]]   # per open group: [size so far, size of the last item]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        top = sizes[-1]
        if c == "\\":
            i += 2
            top[1] = 1
            top[0] += 1
        elif c == "[":
            i += 1
            if i < n and pattern[i] == "]":
                i += 1
            while i < n and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
            top[1] = 1
            top[0] += 1
        elif c == "(":
            sizes.append([0, 0])
            if len(sizes) > MAX_SCHEMA_DEPTH:
                raise InvalidInputError(f"{where}: the pattern nests groups deeper than {MAX_SCHEMA_DEPTH}")
            i += 1
        elif c == ")":
            if len(sizes) > 1:
                inner = sizes.pop()[0]
                sizes[-1][0] += inner
                sizes[-1][1] = inner
            i += 1
        elif c in "*+?{":
            if c == "{":
                end = pattern.find("}", i)
                if end < 0:
                    raise InvalidInputError(f"{where}: unbalanced '{{' in pattern /{pattern[:80]}/")
                low, high = _repeat_bounds(pattern[i + 1:end], pattern, where)
                i = end + 1
            else:
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                i += 1
            times = high if high is not None else low + 1
            top[0] += top[1] * (times - 1)
            top[1] *= times
        else:
            top[1] = 1
            top[0] += 1
            i += 1
        if sizes[-1][0] > MAX_PATTERN_SIZE:
            raise InvalidInputError(f"{where}: the pattern expands to more than {MAX_PATTERN_SIZE} items "
                                    f"(/{pattern[:80]}/)")
    return sizes[0][0]


def check_gbnf(text: str, where: str = "grammar") -> None:
    """InvalidInputError when GBNF text is over the bounds that keep llama.cpp's recursive parse shallow: its size,
    its rule count and the nesting of its groups (string literals and character classes skipped)."""
    if not isinstance(text, str):
        raise InvalidInputError(f"{where} must be GBNF text")
    if len(text) > MAX_GBNF_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_GBNF_BYTES:
        raise InvalidInputError(f"{where}: the grammar is larger than {MAX_GBNF_BYTES} bytes")
    if "\x00" in text:
        raise InvalidInputError(f"{where}: the grammar holds a NUL character")
    if len(_RULE.findall(text)) > MAX_GBNF_RULES:
        raise InvalidInputError(f"{where}: the grammar has more than {MAX_GBNF_RULES} rules")
    depth, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"[":
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            if depth > MAX_GBNF_DEPTH:
                raise InvalidInputError(f"{where}: the grammar nests groups deeper than {MAX_GBNF_DEPTH}")
        elif c == ")":
            depth -= 1
        i += 1


def schema_gbnf(schema, where: str) -> str:
    """Checked GBNF text (root rule "root") for a JSON schema, from llama-cpp-python's converter."""
    if not isinstance(schema, (dict, bool)):
        raise InvalidInputError(f"{where}: a JSON schema must be an object")
    check_schema(schema, where)
    try:
        text = llama_cpp.llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise InvalidInputError(f"{where}: the JSON schema refers to itself too deeply") from None
    except Exception as e:  # the converter's own errors: a schema it cannot express
        raise InvalidInputError(f"{where}: this JSON schema has no grammar ({type(e).__name__}: "
                                f"{str(e)[:200]})") from None
    check_gbnf(text, where)
    return text


def from_gbnf(text: str, where: str = "grammar", root: str = "root"):
    """A llama-cpp-python LlamaGrammar for checked GBNF text."""
    check_gbnf(text, where)
    grammar = llama_cpp.llama_grammar.LlamaGrammar.from_string(text, verbose=False)
    grammar._root = root
    return grammar


def from_schema(schema, where: str):
    """A llama-cpp-python LlamaGrammar for a JSON schema (checked at both levels)."""
    return from_gbnf(schema_gbnf(schema, where), where)


def any_json(where: str = "response_format"):
    """Any JSON object (json_object without a schema)."""
    return from_gbnf(llama_cpp.llama_grammar.JSON_GBNF, where)
