#!/usr/bin/env python3
"""Fetch the pinned llama-cpp-python sdist, verify it, extract its llama.cpp and apply patches/.

The pin (package, version, sha256) lives in llama-cpp-python.pin at the repository root. The sdist is
downloaded once with pip (by package name, from the configured index) into a cache outside the repository;
the patched tree goes to third_party/llama.cpp (git-ignored). Re-running is a no-op while the pin and the
patch series are unchanged; when they change, the tree is extracted and patched again.

    python scripts/prepare_source.py            # prepare third_party/llama.cpp
    python scripts/prepare_source.py --sdist    # only print the path of the verified sdist
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN_FILE = ROOT / "llama-cpp-python.pin"
PATCH_DIR = ROOT / "patches"
DEST = ROOT / "third_party" / "llama.cpp"
STAMP = DEST / ".lminf-stamp"


def cache_dir() -> Path:
    base = os.environ.get("LMINF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lminf_gguf")
    return Path(base)


def read_pin() -> tuple[str, str, str]:
    for line in PIN_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            spec, digest = line.split()
            name, version = spec.split("==")
            return name, version, digest.removeprefix("sha256:")
    sys.exit(f"error: no pin found in {PIN_FILE}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist() -> Path:
    name, version, digest = read_pin()
    dest = cache_dir() / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    sdist = dest / f"{name.replace('-', '_')}-{version}.tar.gz"
    if not sdist.exists() or sha256(sdist) != digest:
        print(f"prepare_source: downloading {name}=={version} (sdist) with pip", file=sys.stderr)
        # --no-build-isolation: pip only needs the metadata, not a build environment of sdists
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-build-isolation",
               "--no-binary", name, f"{name}=={version}", "-d", str(dest)]
        subprocess.run(cmd, check=True)
    got = sha256(sdist)
    if got != digest:
        sdist.unlink()
        sys.exit(f"error: sha256 mismatch for {sdist.name}: expected {digest}, got {got}")
    return sdist


def series() -> list[Path]:
    names = [n.strip() for n in (PATCH_DIR / "series").read_text().splitlines()]
    return [PATCH_DIR / n for n in names if n and not n.startswith("#")]


def stamp_text(digest: str, patches: list[Path]) -> str:
    h = hashlib.sha256(digest.encode())
    for p in patches:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest() + "\n"


def extract_llama_cpp(tree: Path) -> None:
    """The pinned sdist's vendor/llama.cpp, unpatched, into the directory tree."""
    with tarfile.open(fetch_sdist()) as tar:
        prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        # the sdist carries a submodule .git pointer that leads nowhere once extracted
        members = [m for m in members if m.name and m.name != ".git"]
        tar.extractall(tree, members=members, filter="data")


def apply_patch(tree: Path, patch: Path) -> None:
    # a dry run first, so that a failing patch leaves no half-applied files and names its hunk
    for dry in (True, False):
        cmd = ["patch", "-p1", "--forward", "--batch", "--no-backup-if-mismatch", "-i", str(patch)]
        res = subprocess.run(cmd + (["--dry-run"] if dry else []), cwd=tree, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"error: patch {patch.name} does not apply to llama.cpp:\n{res.stdout}{res.stderr}")


def prepare() -> Path:
    _, _, digest = read_pin()
    patches = series()
    want = stamp_text(digest, patches)
    if STAMP.exists() and STAMP.read_text() == want:
        return DEST

    DEST.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=DEST.parent) as tmp:
        tree = Path(tmp)
        extract_llama_cpp(tree)
        for p in patches:
            print(f"prepare_source: applying {p.name}", file=sys.stderr)
            apply_patch(tree, p)
        (tree / STAMP.name).write_text(want)
        # keep the old tree's timestamps out of the way: a fresh extraction replaces it whole
        if DEST.exists():
            shutil.rmtree(DEST)
        tree.rename(DEST)
        os.makedirs(tmp)  # TemporaryDirectory cleans up the (now empty) path it created
    return DEST


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", action="store_true", help="only fetch and verify the sdist, print its path")
    args = ap.parse_args()
    print(fetch_sdist() if args.sdist else prepare())


if __name__ == "__main__":
    main()
