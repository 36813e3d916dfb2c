#!/usr/bin/env python3
"""Fuzz the state-file loader: N mutated state files, each loaded into a live session in a child process.

    python scripts/fuzz_state.py 2000 [--seed 1] [--json results/fuzz_state.json]

The files are a real state file of a tiny model with one mutation each: header fields set to values of other
types, out of range or absurd (nested, huge, negative, NaN), the header replaced by other JSON, byte flips,
truncations and extensions of the logits, text and llama.cpp's cache blob, broken length fields; the checksum is
recomputed for nine files in ten, so that the checks behind it are what is tested. Each file is loaded into a
session that holds a sequence of its own. Outcomes:

  refused           StateError, and the session exactly as it was (last logits, positions)
  accepted          loaded, and the session then decodes a token to finite logits
  accepted-wrong    loaded, but the next decode fails or is not finite: the cache's own numbers were damaged
                    (a flipped exponent bit is a NaN in a key) and the checksum recomputed; reported, not a
                    failure: the loader checks structure, positions and llama.cpp's acceptance, not the values
  refused-changed   StateError, but the session was changed          (a failure)
  error             another exception                                  (a failure: not the documented one)
  crash / hang      the child died or stopped answering                (failures)

Exit code 1 on any failure. tests/test_state_files.py runs a seeded slice; docs/RELIABILITY.md has the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import struct
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAGIC = b"LMINFST\x00"
FAILURES = ("refused-changed", "error", "crash", "hang")
SESSION = dict(mode="lminf", n_global=4, n_local=16, n_batch=7, type_k="f32", type_v="f32", n_threads=1)
# --topk: an lminf-topk session, whose files also hold the middle-token store (mutated as often as the cache)
TOPK_SESSION = dict(SESSION, mode="lminf-topk", topk=3, topk_layer=1, topk_dist=8, store_type="f32")


def session_args(topk: bool) -> dict:
    return TOPK_SESSION if topk else SESSION

# -- files -------------------------------------------------------------------------------------------------------


def _split(data: bytes):
    version, hlen = struct.unpack_from("<II", data, len(MAGIC))
    off = len(MAGIC) + 8
    header = json.loads(data[off:off + hlen])
    parts, pos = [], off + hlen
    for _ in range({2: 3, 3: 4}.get(version, 5)):   # sections: logits, text, (3: token ids,) sequence, (4: store)
        (n,) = struct.unpack_from("<Q", data, pos)
        parts.append(data[pos + 8:pos + 8 + n])
        pos += 8 + n
    return version, header, parts


def _join(version, header, parts, *, header_bytes=None, checksum=True) -> bytes:
    h = header_bytes if header_bytes is not None else json.dumps(header).encode()
    body = MAGIC + struct.pack("<II", version, len(h)) + h + b"".join(struct.pack("<Q", len(p)) + p for p in parts)
    return body + (hashlib.sha256(body).digest() if checksum else os.urandom(32))


def _odd_value(rng: random.Random):
    return rng.choice([-1, 0, 1, 2**31, 2**63, -2**63, 10**30, 1.5, float("nan"), float("inf"), True, False, None,
                       "", "x" * 1000, "0", [1, 2], {"a": 1}, [[[[[]]]]], "\u0000", {"pos": 1}])


def mutate(base: bytes, rng: random.Random) -> tuple[str, bytes]:
    version, header, parts = _split(base)
    kind = rng.choice(["field", "field", "field", "drop", "header", "blob", "blob", "blob", "parts", "version",
                       "lengths", "truncate", "deep"])
    checksum = rng.random() < 0.9
    if kind == "field":
        key = rng.choice(sorted(header) + ["pos", "n_seen", "n_rebase", "pos", "n_seen"])
        header[key] = _odd_value(rng)
        if rng.random() < 0.3 and isinstance(header.get("pos"), int):
            header["pos"] = int(header["pos"]) + rng.choice([-3, -1, 1, 2, 100])
        return f"field {key}", _join(version, header, parts, checksum=checksum)
    if kind == "drop":
        key = rng.choice(sorted(header))
        header.pop(key)
        return f"drop {key}", _join(version, header, parts, checksum=checksum)
    if kind == "header":
        other = rng.choice([[], "text", 3, None, [header], {"extra": header}, {}])
        return "header", _join(version, other, parts, checksum=checksum)
    if kind == "deep":
        depth = rng.choice([100, 1000, 50000])
        return f"deep {depth}", _join(version, None, parts, header_bytes=b"[" * depth + b"]" * depth,
                                      checksum=checksum)
    if kind == "blob":
        # llama.cpp's sequence, or the top-k store where there is one (version 4: the last two sections)
        which = len(parts) - 1 if len(parts) == 5 and parts[-1] and rng.random() < 0.5 else min(3, len(parts) - 1)
        blob = bytearray(parts[which])
        for _ in range(rng.choice([1, 1, 2, 4, 8])):
            if blob:
                at = rng.randrange(min(len(blob), rng.choice([16, 64, 256, len(blob)])))
                blob[at] = rng.randrange(256) if rng.random() < 0.5 else blob[at] ^ (1 << rng.randrange(8))
        new = list(parts)
        new[which] = bytes(blob)
        return "store flip" if which == 4 else "blob flip", _join(version, header, new, checksum=checksum)
    if kind == "parts":
        i = rng.randrange(len(parts))
        p = bytearray(parts[i])
        if rng.random() < 0.5 and p:
            del p[rng.randrange(len(p)):]
        else:
            p += os.urandom(rng.choice([1, 4, 100]))
        new = list(parts)
        new[i] = bytes(p)
        return f"part {i} length", _join(version, header, new, checksum=checksum)
    if kind == "version":
        return "version", _join(rng.choice([0, 1, 2, 4, 2**32 - 1]), header, parts, checksum=checksum)
    if kind == "lengths":
        data = bytearray(_join(version, header, parts))
        hlen = struct.unpack_from("<I", data, len(MAGIC) + 4)[0]
        at = rng.choice([len(MAGIC) + 4, len(MAGIC) + 8 + hlen])
        struct.pack_into("<I" if at == len(MAGIC) + 4 else "<Q", data, at, rng.choice([0, 1, 2**31, 2**32 - 1]))
        body = bytes(data[:-32])
        return "length field", body + (hashlib.sha256(body).digest() if checksum else data[-32:])
    data = _join(version, header, parts)
    return "truncate", data[:rng.randrange(len(data))]


def make_cases(root: str, n: int, seed: int = 0, topk: bool = False):
    """The tiny model, the base state file and n mutated files; return (model path, [(path, description)])."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import write_tiny_llama

    import lminf_gguf

    os.makedirs(root, exist_ok=True)
    model = write_tiny_llama(os.path.join(root, "model.gguf"), seed=seed + 1, dtype="f32", n_head=4, n_head_kv=2)
    llm = lminf_gguf.LMInfinite(model, **session_args(topk))
    rng = random.Random(seed)
    llm.feed([4 + rng.randrange(90) for _ in range(60)])
    base_path = os.path.join(root, "base.lminf")
    llm.save_state(base_path, extra={"note": "base"})
    llm.close()
    base = open(base_path, "rb").read()
    cases = [(base_path, "unchanged")]
    for i in range(n):
        name, data = mutate(base, rng)
        p = os.path.join(root, f"f{i:05d}.lminf")
        with open(p, "wb") as f:
            f.write(data)
        cases.append((p, name))
    return model, cases


# -- children ----------------------------------------------------------------------------------------------------


def _child(model: str, list_file: str, timeout: int, topk: bool) -> None:
    import numpy as np

    import lminf_gguf

    llm = lminf_gguf.LMInfinite(model, **session_args(topk))
    own = [5 + (i * 7) % 80 for i in range(45)]

    def probe():
        info = llm.cache_info()
        return (None if llm.seq.last is None else llm.seq.last.tobytes(), info["position"], info["n_tokens"],
                info["rebases"], None if llm.seq.text is None else bytes(llm.seq.text))

    for i, p in enumerate(line.rstrip("\n") for line in open(list_file)):
        print("@@" + json.dumps({"start": i}), flush=True)
        signal.alarm(timeout)
        llm.reset()
        llm.feed(own)                 # the session's own sequence, different from the files'
        before = probe()
        res = {"i": i}
        try:
            llm.load_state(p)
        except lminf_gguf.StateError as e:
            res.update(outcome="refused" if probe() == before else "refused-changed", msg=str(e)[:200])
        except Exception as e:  # noqa: BLE001 (any other exception breaks the documented contract)
            res.update(outcome="error", type=type(e).__name__, msg=str(e)[:300])
        else:
            try:
                out = llm.logits([5]) if llm.cache_info()["n_tokens"] == 0 else next(llm.eval([5]))
                ok = bool(np.isfinite(np.asarray(out)).all())
                res.update(outcome="accepted" if ok else "accepted-wrong")
            except Exception as e:  # noqa: BLE001
                res.update(outcome="accepted-wrong", type=type(e).__name__, msg=str(e)[:300])
        signal.alarm(0)
        print("@@" + json.dumps(res), flush=True)


def run_files(model: str, paths, *, timeout: int = 20, log=None, topk: bool = False):
    """Load every path in children (fuzz_gguf.py's runner); one result dict per path."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fuzz_gguf

    return fuzz_gguf.run_files(paths, timeout=timeout, log=log, script=__file__,
                               extra=["--model", model] + (["--topk"] if topk else []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", type=int, nargs="?", default=1000, help="number of mutated files (default 1000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=20, help="seconds per file before it counts as a hang")
    ap.add_argument("--json", help="write every file's outcome here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--topk", action="store_true", help="an lminf-topk session (the files hold its store)")
    args = ap.parse_args(argv)
    if args.child:
        _child(args.model, args.child, args.timeout, args.topk)
        return 0
    with tempfile.TemporaryDirectory(prefix="fuzz_state_") as root:
        model, cases = make_cases(root, args.n, seed=args.seed, topk=args.topk)
        results = run_files(model, [p for p, _ in cases], timeout=args.timeout,
                            log=lambda s: print(s, file=sys.stderr), topk=args.topk)
    counts = Counter(r["outcome"] for r in results)
    print(f"{len(cases)} files: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    bad = [(name, r) for (_, name), r in zip(cases, results) if r["outcome"] in FAILURES]
    for name, r in bad[:20]:
        print(f"FAIL {name}: {r}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump([dict(r, case=name) for (_, name), r in zip(cases, results)], f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
