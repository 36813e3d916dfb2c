#!/usr/bin/env python3
"""Fuzz the model loader: write N hostile variants of a tiny GGUF model and load each with LMInfinite.

    python scripts/fuzz_gguf.py 2000 [--seed 1] [--dir DIR] [--keep]

Every file is loaded (and, when it loads, one 3-token decode is run) in a child process that holds many files
in turn, under an address-space limit (RLIMIT_AS, --mem-gb) and a per-file alarm (--timeout): a crash signal,
a hang or an out-of-memory kill ends the child, is recorded against the file it was working on, and a new child
carries on with the next file. Outcomes: "ok" (loaded), "error" (a Python exception, as the API promises),
"crash" / "hang" (failures). Exit code 1 when any file crashed or hung, or an error had an empty message.

tests/test_fuzz_gguf.py runs a few hundred files of it in the regular suite; docs/RELIABILITY.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------------------------
# mutations


def _sections(path: str):
    """Offsets in the tiny model: end of the fixed header, start of the tensor-info table, start of the data,
    and the byte offsets of selected KV values / tensor-info fields."""
    import gguf

    r = gguf.GGUFReader(path)
    kv_start = 24
    ti_start = r.tensors[0].field.offset
    data_start = r.data_offset
    fields = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        offs, pos = [], f.offset
        for part in f.parts:
            offs.append(pos)
            pos += part.nbytes
        fields[name] = (f, offs)
    tinfo = []
    for t in r.tensors:
        offs, pos = [], t.field.offset
        for part in t.field.parts:
            offs.append(pos)
            pos += part.nbytes
        tinfo.append((t, offs))
    return kv_start, ti_start, data_start, fields, tinfo


def _put(data: bytearray, off: int, fmt: str, value) -> bytearray:
    out = bytearray(data)
    struct.pack_into(fmt, out, off, value)
    return out


def _rewrite(base: str, dst: str, *, arch=None, drop=(), set_kv=None, drop_tensors=(), reshape=None) -> None:
    """Re-emit the base model through GGUFWriter with KV / tensor edits (lengths may change, offsets stay valid)."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(base)
    a = arch if arch is not None else bytes(r.fields["general.architecture"].parts[-1]).decode()
    w = gguf.GGUFWriter(dst, a)
    if arch is None and "general.architecture" in drop:
        w.kv_data[0].pop("general.architecture", None)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        if set_kv and name in set_kv:
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(name, f.contents(), vtype)
    for name, (value, vtype) in (set_kv or {}).items():
        if vtype == gguf.GGUFValueType.ARRAY:
            item = (gguf.GGUFValueType.STRING if value and isinstance(value[0], str) else
                    gguf.GGUFValueType.FLOAT32 if value and isinstance(value[0], float) else gguf.GGUFValueType.INT32)
            w.add_key_value(name, value, vtype, sub_type=item)
        else:
            w.add_key_value(name, value, vtype)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        shape = [int(x) for x in reversed(t.shape)]
        data = t.data
        if reshape and t.name in reshape:
            shape = reshape[t.name]
            k = int(np.prod(shape))
            data = data.reshape(-1)[:k] if k <= data.size else np.zeros(k, data.dtype)
        w.add_tensor(t.name, data.reshape(shape), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def repeated_token_text(base: str, i: int = 69, j: int = 10) -> list:
    """The base model's token texts with token i given the text of token j (a one-byte flip can do this)."""
    import gguf

    tokens = list(gguf.GGUFReader(base).fields["tokenizer.ggml.tokens"].contents())
    tokens[i] = tokens[j]
    return tokens


def semantic_cases(base: str):
    """(name, writer) pairs of well-formed GGUF files with wrong content (arch, keys, vocabulary, tensors)."""
    import gguf

    V = gguf.GGUFValueType
    cases = []
    for arch in ["", "gpt9", "gemma3", "mamba", "bert", "qwen2", "rwkv6", "a" * 300, "llama\x00x", "LLAMA"]:
        cases.append((f"arch={arch[:12]!r}", dict(arch=arch)))
    cases.append(("no-architecture", dict(drop=("general.architecture",))))
    for key in ["llama.context_length", "llama.embedding_length", "llama.block_count", "llama.attention.head_count",
                "llama.feed_forward_length", "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.tokens",
                "tokenizer.ggml.model", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"]:
        cases.append((f"drop {key}", dict(drop=(key,))))
    for key, values in {
        "llama.block_count": [0, 1, 1000, 2**31 - 1, 2**32 - 1],
        "llama.attention.head_count": [0, 3, 7, 2**31 - 1, 2**32 - 1],
        "llama.attention.head_count_kv": [0, 3, 5, 2**32 - 1],
        "llama.embedding_length": [0, 1, 63, 128, 2**31 - 1, 2**32 - 1],
        "llama.context_length": [0, 1, 2**31 - 1, 2**32 - 1],
        "llama.rope.dimension_count": [0, 1, 3, 4096, 2**32 - 1],
        "llama.feed_forward_length": [0, 2**32 - 1],
        "tokenizer.ggml.bos_token_id": [96, 10**6, 2**31 - 1, 2**32 - 1],
        "tokenizer.ggml.eos_token_id": [96, 2**32 - 1],
        "tokenizer.ggml.unknown_token_id": [96, 2**32 - 1],
        "llama.vocab_size": [0, 95, 97, 2**32 - 1],
    }.items():
        for v in values:
            cases.append((f"{key}={v}", dict(set_kv={key: (v, V.UINT32)})))
    for key in ["llama.block_count", "llama.attention.head_count", "llama.context_length", "llama.embedding_length"]:
        cases.append((f"{key} as string", dict(set_kv={key: ("64", V.STRING)})))
        cases.append((f"{key} as float", dict(set_kv={key: (64.5, V.FLOAT32)})))
        cases.append((f"{key} as array", dict(set_kv={key: ([1, 2], V.ARRAY)})))
    for key, v in [("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.model", "bert"), ("tokenizer.ggml.model", "xx"),
                   ("tokenizer.ggml.model", "none"),
                   ("tokenizer.ggml.model", "rwkv"), ("tokenizer.ggml.model", "plamo2"),
                   ("tokenizer.ggml.model", "no_vocab"), ("tokenizer.ggml.model", "t5"), ("tokenizer.ggml.model", ""),
                   ("tokenizer.ggml.pre", "nonexistent"), ("llama.rope.scaling.type", "yarn"),
                   ("llama.rope.scaling.type", "bogus"), ("tokenizer.chat_template", "{% for %}"),
                   ("general.name", "x" * 100000)]:
        cases.append((f"{key}={v[:12]!r}", dict(set_kv={key: (v, V.STRING)})))
    for key, v in [("llama.rope.freq_base", 0.0), ("llama.rope.freq_base", float("nan")),
                   ("llama.rope.freq_base", float("inf")), ("llama.rope.freq_base", -1.0),
                   ("llama.attention.layer_norm_rms_epsilon", float("nan")),
                   ("llama.attention.layer_norm_rms_epsilon", 0.0),
                   ("llama.attention.layer_norm_rms_epsilon", -1e-5), ("llama.attention.layer_norm_rms_epsilon",
                                                                       float("inf")),
                   ("llama.rope.scaling.factor", 0.0), ("llama.rope.scaling.factor", float("nan")),
                   ("llama.rope.scaling.factor", -4.0)]:
        cases.append((f"{key}={v}", dict(set_kv={key: (v, V.FLOAT32)})))
    cases.append(("token_type out of range", dict(set_kv={"tokenizer.ggml.token_type": ([99] * 96, V.ARRAY)})))
    cases.append(("token_type too short", dict(set_kv={"tokenizer.ggml.token_type": ([1] * 10, V.ARRAY)})))
    cases.append(("token_type negative", dict(set_kv={"tokenizer.ggml.token_type": ([-5] * 96, V.ARRAY)})))
    cases.append(("token text repeated", dict(set_kv={"tokenizer.ggml.tokens": (repeated_token_text(base), V.ARRAY)})))
    # a vocabulary of one token (and of none): arrays and sizes agree, the model's embedding does not
    for n in (1,):  # (the gguf writer refuses empty arrays: a vocabulary of none is among the byte cases' counts)
        cases.append((f"vocabulary of {n}", dict(set_kv={"tokenizer.ggml.tokens": (["a"] * n, V.ARRAY),
                                                          "tokenizer.ggml.scores": ([0.0] * n, V.ARRAY),
                                                          "tokenizer.ggml.token_type": ([1] * n, V.ARRAY),
                                                          "llama.vocab_size": (n, V.UINT32)})))
    for t in ["token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight",
              "output_norm.weight", "blk.0.attn_norm.weight"]:
        cases.append((f"drop tensor {t}", dict(drop_tensors=(t,))))
    for t, shape in [("token_embd.weight", [64, 96]), ("token_embd.weight", [95, 64]),
                     ("blk.0.attn_q.weight", [32, 64]), ("blk.0.attn_k.weight", [64, 64]),
                     ("blk.0.attn_norm.weight", [32]), ("blk.0.attn_norm.weight", [64, 1]),
                     ("output.weight", [96, 32]), ("blk.1.ffn_up.weight", [96, 64, 1])]:
        cases.append((f"tensor {t} shape {shape}", dict(reshape={t: shape})))
    return cases


def byte_cases(data: bytes, sections, rng: random.Random, n: int):
    """(name, bytes) mutations of the raw file: truncations, byte flips per section, absurd counts and dims."""
    kv_start, ti_start, data_start, fields, tinfo = sections
    size = len(data)
    out = [("empty file", b""), ("text renamed .gguf", b"hello, this is not a model\n" * 40),
           ("random bytes", bytes(rng.getrandbits(8) for _ in range(4096))), ("zeros", bytes(4096)),
           ("magic only", b"GGUF"), ("magic + version", b"GGUF" + struct.pack("<I", 3)),
           ("header only", data[:24]), ("PNG renamed .gguf", b"\x89PNG\r\n\x1a\n" + bytes(200)),
           ("GGML (old) magic", b"lmgg" + data[4:]), ("big-endian GGUF", b"FUGG" + data[4:])]
    # fixed-header fields
    for v in [0, 1, 2, 4, 0xFFFF, 0xFFFFFFFF]:
        out.append((f"version={v}", bytes(_put(bytearray(data), 4, "<I", v))))
    for v in [0, 1, len(tinfo) + 1, 1 << 20, 1 << 31, 1 << 32, (1 << 63) - 1, (1 << 64) - 1]:
        out.append((f"n_tensors={v}", bytes(_put(bytearray(data), 8, "<Q", v))))
    for v in [0, 1, len(fields) + 1, 1 << 20, 1 << 31, 1 << 32, (1 << 63) - 1, (1 << 64) - 1]:
        out.append((f"n_kv={v}", bytes(_put(bytearray(data), 16, "<Q", v))))
    # KV fields: key length, value type, string length, array type / length
    for name, (f, offs) in fields.items():
        for v in [0, 1 << 16, 1 << 40, (1 << 64) - 1]:
            out.append((f"{name}: key length {v}", bytes(_put(bytearray(data), offs[0], "<Q", v))))
        for v in [13, 255, 0xFFFFFFFF]:
            out.append((f"{name}: value type {v}", bytes(_put(bytearray(data), offs[2], "<I", v))))
        if len(f.parts) == 5 and f.types[0] == 8:  # string: length part
            for v in [1 << 30, (1 << 64) - 1]:
                out.append((f"{name}: string length {v}", bytes(_put(bytearray(data), offs[3], "<Q", v))))
        if f.types and f.types[0] == 9:  # array: item type, length
            for v in [9, 13, 0xFFFFFFFF]:
                out.append((f"{name}: array item type {v}", bytes(_put(bytearray(data), offs[3], "<I", v))))
            for v in [0, 1, 1 << 31, 1 << 40, (1 << 64) - 1]:
                out.append((f"{name}: array length {v}", bytes(_put(bytearray(data), offs[4], "<Q", v))))
    # tensor infos: name length, n_dims, dims, type, offset
    for i, (t, offs) in enumerate(tinfo):
        if i % 3 and i != len(tinfo) - 1:
            continue
        nd_off, dims_off, type_off, off_off = offs[2], offs[3], offs[4], offs[5]
        out.append((f"{t.name}: name length 2^40", bytes(_put(bytearray(data), offs[0], "<Q", 1 << 40))))
        for v in [0, 5, 255, 0xFFFFFFFF]:
            out.append((f"{t.name}: n_dims={v}", bytes(_put(bytearray(data), nd_off, "<I", v))))
        for v in [0, 1, 1 << 31, 1 << 32, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]:
            out.append((f"{t.name}: dim0={v}", bytes(_put(bytearray(data), dims_off, "<Q", v))))
        for v in [2, 4, 5, 13, 39, 40, 255, 0xFFFFFFFF]:
            out.append((f"{t.name}: type={v}", bytes(_put(bytearray(data), type_off, "<I", v))))
        for v in [1, 32 * 10**6, size, (1 << 63) - 32, (1 << 64) - 32]:
            out.append((f"{t.name}: offset={v}", bytes(_put(bytearray(data), off_off, "<Q", v))))
    fixed = len(out)
    # random: truncations and byte flips, spread over the sections
    regions = [("header", 0, kv_start), ("kv", kv_start, ti_start), ("tensor-info", ti_start, data_start),
               ("data", data_start, size)]
    k = 0
    while len(out) < max(n, fixed):
        kind = k % 5
        k += 1
        if kind == 0:
            cut = rng.randrange(0, size) if rng.random() < 0.5 else rng.randrange(0, data_start + 64)
            out.append((f"truncated at {cut}", data[:cut]))
            continue
        region = regions[min(kind - 1, 3)] if kind < 4 else rng.choice(regions[1:3])
        _, lo, hi = region
        buf = bytearray(data)
        where = []
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            p = rng.randrange(lo, hi)
            buf[p] = rng.choice([buf[p] ^ (1 << rng.randrange(8)), rng.getrandbits(8), 0xFF, 0x00, 0x7F])
            where.append(p)
        out.append((f"{region[0]} bytes changed at {where[:4]}", bytes(buf)))
    return out


def make_cases(root: str, n: int, seed: int = 0, semantic: bool = True):
    """Write the hostile files under root; return a list of (path, description)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import write_tiny_llama

    os.makedirs(root, exist_ok=True)
    base = write_tiny_llama(os.path.join(root, "base.gguf"), seed=seed + 1)
    data = open(base, "rb").read()
    rng = random.Random(seed)
    files = [(base, "unchanged")]
    if semantic:
        for i, (name, kw) in enumerate(semantic_cases(base)):
            p = os.path.join(root, f"s{i:04d}.gguf")
            try:
                _rewrite(base, p, **kw)
            except Exception as e:  # the writer itself refused: nothing to test
                print(f"skip {name}: {e}", file=sys.stderr)
                continue
            files.append((p, name))
    n_bytes = max(0, n - len(files))
    for i, (name, blob) in enumerate(byte_cases(data, _sections(base), rng, n_bytes)):
        p = os.path.join(root, f"b{i:04d}.gguf")
        with open(p, "wb") as f:
            f.write(blob)
        files.append((p, name))
    return files


# ----------------------------------------------------------------------------------------------------------------
# loading in children


def _child(list_file: str, timeout: int) -> None:
    """Load each file of list_file in turn; print one JSON line per file (and 'start' before it)."""
    import lminf_gguf

    paths = [line.rstrip("\n") for line in open(list_file)]
    for i, p in enumerate(paths):
        print("@@" + json.dumps({"start": i}), flush=True)
        signal.alarm(timeout)  # default action: the child dies with SIGALRM, the parent records a hang
        res = {"i": i}
        try:
            llm = lminf_gguf.LMInfinite(p, n_local=16, n_batch=8, n_threads=1)
            try:
                llm.logits([1, 2, 3][: llm.n_vocab])
                # the paths that read special tokens: tokenising with BOS, sampling, the chat template
                res["outcome"] = "ok"
                llm.generate([1, 5, 6][: llm.n_vocab], max_tokens=2, temperature=0)
                llm.create_chat_completion([{"role": "user", "content": "t3"}], max_tokens=2)
            except ValueError as e:  # after a successful load: the text/tokens this model cannot take
                if res.get("outcome") != "ok":
                    raise
                res["later"] = str(e)[:200]
            finally:
                llm.close()
        except MemoryError as e:
            res.update(outcome="error", type="MemoryError", msg=str(e))
        except Exception as e:
            res.update(outcome="error", type=type(e).__name__, msg=str(e))
        signal.alarm(0)
        print("@@" + json.dumps(res), flush=True)


def _limit(mem_gb: float):
    def set_limits():
        import resource
        lim = int(mem_gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return set_limits


def run_files(paths, *, timeout: int = 20, mem_gb: float = 4.0, log=None, script: str = __file__, extra=()):
    """Load every path in children (`script --child LIST --timeout T *extra`, which prints '@@' JSON lines: a
    'start' before each file, then its result); return one result dict per path, a child's crash or hang recorded
    against the file it was working on (outcome "crash" / "hang") before a new child carries on."""
    results = [None] * len(paths)
    start = 0
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", GGML_NO_BACKTRACE="1")
    with tempfile.TemporaryDirectory() as tmp:
        while start < len(paths):
            lst = os.path.join(tmp, "list.txt")
            with open(lst, "w") as f:
                f.write("\n".join(str(p) for p in paths[start:]) + "\n")
            proc = subprocess.Popen([sys.executable, os.path.abspath(script), "--child", lst, "--timeout",
                                     str(timeout), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, cwd=tmp, env=env, preexec_fn=_limit(mem_gb))
            current = None
            for line in proc.stdout:
                if not line.startswith("@@"):
                    continue  # the library's own output
                msg = json.loads(line[2:])
                if "start" in msg:
                    current = start + msg["start"]
                else:
                    results[start + msg["i"]] = msg
                    current = None
            err = proc.stderr.read()
            rc = proc.wait()
            if current is None:
                if any(r is None for r in results[start:]):
                    raise RuntimeError(f"fuzz child stopped between files (rc {rc}): {err[-2000:]}")
                break
            sig = -rc if rc < 0 else None
            outcome = "hang" if sig == signal.SIGALRM else "crash"
            results[current] = {"i": current - start, "outcome": outcome, "rc": rc,
                                "signal": signal.Signals(sig).name if sig else None, "stderr": err[-1500:]}
            if log:
                log(f"{outcome}: {paths[current]} rc={rc} {results[current]['signal']}\n{err[-600:]}")
            start = current + 1
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, nargs="?", default=1000, help="number of files (default 1000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", help="write the files here (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    ap.add_argument("--timeout", type=int, default=20, help="seconds per file before it counts as a hang")
    ap.add_argument("--mem-gb", type=float, default=4.0, help="address-space limit of the loading process")
    ap.add_argument("--json", help="write every file's outcome here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.timeout)
        return 0
    root = args.dir or tempfile.mkdtemp(prefix="fuzz_gguf_")
    cases = make_cases(root, args.n, seed=args.seed)
    results = run_files([p for p, _ in cases], timeout=args.timeout, mem_gb=args.mem_gb,
                        log=lambda s: print(s, file=sys.stderr))
    counts = Counter(r["outcome"] for r in results)
    bad = [(c, r) for c, r in zip(cases, results) if r["outcome"] in ("crash", "hang")
           or (r["outcome"] == "error" and not r.get("msg"))]
    print(f"{len(cases)} files: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for (p, name), r in bad:
        print(f"FAIL {name} ({p}): {r}")
    kinds = Counter(r.get("type") for r in results if r["outcome"] == "error")
    print("errors by type: " + ", ".join(f"{k} {v}" for k, v in kinds.most_common()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(r, file=p, case=name) for (p, name), r in zip(cases, results)], f, indent=1)
    if not args.keep and not args.dir:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
