#!/usr/bin/env python3
"""Fetch the long texts used by evaluations and benchmarks, by package name, with verified hashes.

- austen: Jane Austen's six novels (public domain), from the Debian package r-cran-janeaustenr
  (`apt-get download`, sha256 of the .deb pinned below), read from its R data files with the small
  stdlib-only reader in this file, concatenated in a fixed order into austen.txt (one line per text line).
- stdlib: the Python standard library's .py files, sorted by path, concatenated into stdlib.txt (a code stream;
  its content follows the running Python's version, so it is not hash-pinned).

Files go to $LMINF_DATA (default ~/.cache/lminf_gguf/data); nothing is written into the repository.

    python scripts/fetch_data.py austen     # prints the path of austen.txt
    python scripts/fetch_data.py stdlib
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zlib
from pathlib import Path

AUSTEN_DEB = "r-cran-janeaustenr_1.0.0-1_all.deb"
AUSTEN_DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
# sha256 of the extracted austen.txt: the reader's output is checked too, not only the package
AUSTEN_TXT_SHA256 = "f2516f2139e3cecf49657122fed58ac46313f1fdff32a26fc66789293e92d573"
AUSTEN_BOOKS = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion"]


def data_dir() -> Path:
    base = os.environ.get("LMINF_DATA") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lminf_gguf", "data")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- a minimal reader of R's serialization format (XDR, versions 2 and 3), enough for character vectors -------

class _RReader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an R XDR serialization")
        self.d, self.i, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()
        if version == 3:
            n = self.int()  # native encoding name
            self.i += n

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.d, self.i)
        self.i += 4
        return v

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (254, 242, 241, 253):  # NULL, empty/base/global environment
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # symbol
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.d[self.i:self.i + n].decode("utf-8", errors="replace")
            self.i += n
            return s
        if kind == 2:  # pairlist: a dict of tag -> value
            out = {}
            while kind == 2:
                if has_attr:
                    self.item()  # attributes of a pairlist cell: not needed here
                tag = self.item() if has_tag else None
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
            return out
        if kind in (10, 13):  # logical, integer
            n = self.int()
            vals = list(struct.unpack_from(f">{n}i", self.d, self.i))
            self.i += 4 * n
            return self._attrs(vals, has_attr)
        if kind == 14:  # double
            n = self.int()
            vals = list(struct.unpack_from(f">{n}d", self.d, self.i))
            self.i += 8 * n
            return self._attrs(vals, has_attr)
        if kind in (16, 19):  # character vector, list
            n = self.int()
            vals = [self.item() for _ in range(n)]
            return self._attrs(vals, has_attr)
        raise ValueError(f"unsupported R object type {kind}")

    def _attrs(self, vals, has_attr):
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if names is not None:
                return dict(zip(names, vals))
        return vals


def read_rdata(rdx: Path, rdb: Path) -> dict:
    """The objects of an R lazy-load database (.rdx index + .rdb blobs) as Python values."""
    index = _RReader(gzip.decompress(rdx.read_bytes())).item()
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[offset:offset + length]
        out[name] = _RReader(zlib.decompress(chunk[4:])).item()
    return out


def fetch_austen() -> Path:
    out = data_dir() / "austen.txt"
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr=1.0.0-1"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deb = Path(tmp) / AUSTEN_DEB
        if sha256(deb) != AUSTEN_DEB_SHA256:
            sys.exit(f"error: sha256 mismatch for {AUSTEN_DEB}")
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        data = Path(tmp) / "usr/lib/R/site-library/janeaustenr/data"
        books = read_rdata(data / "Rdata.rdx", data / "Rdata.rdb")
        lines = []
        for name in AUSTEN_BOOKS:
            lines.extend(line or "" for line in books[name])
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        if sha256(tmp_out) != AUSTEN_TXT_SHA256:
            tmp_out.unlink()
            sys.exit("error: austen.txt does not match its pinned sha256 (reader or package changed)")
        tmp_out.rename(out)
    return out


def fetch_stdlib() -> Path:
    out = data_dir() / f"stdlib-{sys.version_info.major}.{sys.version_info.minor}.txt"
    if out.exists():
        return out
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    tmp_out = out.with_suffix(".tmp")
    with open(tmp_out, "w", encoding="utf-8") as f:
        for p in files:
            f.write(f"# ---- {p.relative_to(root)}\n")
            f.write(p.read_text(encoding="utf-8", errors="replace"))
    tmp_out.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=["austen", "stdlib"])
    args = ap.parse_args()
    print(fetch_austen() if args.name == "austen" else fetch_stdlib())


if __name__ == "__main__":
    main()
