#!/usr/bin/env python3
"""Check that every intermediate state of the patch series compiles: patches 1..k applied to the pinned llama.cpp,
for each k, and the C/C++ sources the series has touched so far syntax-checked (`-fsyntax-only`) with the flags of
the last build (its compile_commands.json, so run `make install` first). CUDA sources are not checked (nvcc;
scripts/cuda_compile_check.sh builds the final tree). Use it after editing or refreshing the series.

    python scripts/check_series.py            # every state (about 20 minutes on 2 cores)
    python scripts/check_series.py 14 15      # the states after patches 14 and 15
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prepare_source  # noqa: E402  (scripts/prepare_source.py)

ROOT = prepare_source.ROOT
SRC = str(prepare_source.DEST) + "/"


def compile_db() -> dict:
    found = sorted(ROOT.glob("build/*/compile_commands.json"))
    if not found:
        sys.exit("error: no build/*/compile_commands.json: run `make install` first")
    return {e["file"].replace(SRC, ""): e for e in json.loads(found[-1].read_text())}


def touched(patch: Path) -> set:
    return {line[6:].strip() for line in patch.read_text(errors="replace").splitlines() if line.startswith("+++ b/")}


def syntax_check(db: dict, tree: Path, path: str) -> tuple[str, str]:
    """(path, errors): the build's command for path (or for a sibling in its directory, for a file the build does
    not know), pointed at tree, with -fsyntax-only."""
    entry = db.get(path)
    if entry is None:
        sibling = next((k for k in db if Path(k).parent == Path(path).parent and Path(k).suffix == Path(path).suffix),
                       None)
        if sibling is None:
            return path, ""
        entry = dict(db[sibling], command=db[sibling]["command"].replace(sibling, path))
    args, skip = [], False
    for a in shlex.split(entry["command"]):
        if skip:
            skip = False
        elif a == "-o":
            skip = True
        elif a != "-c":
            args.append(a.replace(SRC, str(tree) + "/"))
    res = subprocess.run(args + ["-fsyntax-only"], cwd=entry["directory"], capture_output=True, text=True)
    return path, res.stderr if res.returncode else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("states", type=int, nargs="*", help="patch numbers whose state to check (default: all)")
    ap.add_argument("-j", type=int, default=2, help="files checked at once (default 2)")
    args = ap.parse_args()

    db = compile_db()
    patches = prepare_source.series()
    want = set(args.states) or set(range(1, len(patches) + 1))
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp)
        prepare_source.extract_llama_cpp(tree)
        files: set = set()
        for k, patch in enumerate(patches, 1):
            prepare_source.apply_patch(tree, patch)
            files |= touched(patch)
            if k not in want:
                continue
            sources = sorted(f for f in files if f.endswith((".c", ".cpp")) and (tree / f).exists()
                             and "ggml-cuda" not in f and not f.startswith("tests/") and "spacemit" not in f)
            with ThreadPoolExecutor(args.j) as ex:
                errors = [(f, e) for f, e in ex.map(lambda f: syntax_check(db, tree, f), sources) if e]
            if "tests/test-backend-ops.cpp" in files:
                res = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", f"-I{tree}/ggml/include",
                                      str(tree / "tests/test-backend-ops.cpp")], capture_output=True, text=True)
                if res.returncode:
                    errors.append(("tests/test-backend-ops.cpp", res.stderr))
            print(f"{patch.name}: {'FAIL' if errors else 'ok'} ({len(sources)} sources)", flush=True)
            for f, e in errors:
                failed += 1
                print(f"  {f}:\n" + "\n".join("    " + line for line in e.splitlines()[:20]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
