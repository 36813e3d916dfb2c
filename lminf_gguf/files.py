"""Temporary files next to an output, renamed over it when complete: named with the writing process's id, so that
the leftover of a process killed mid-write (SIGKILL leaves no chance to clean up) is removed by the next writer in
that directory once that process is gone."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path

_NAME = re.compile(r"^\.lminf-[\w.-]*?-p(\d+)-[^/]*\.tmp$")


def remove_stale(directory: Path) -> None:
    """Remove the temporary files of lminf_gguf writers in directory whose process no longer runs."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = _NAME.match(name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))
        except OSError:
            pass  # alive, or not ours to signal: leave it


def temp_next_to(out: Path, tag: str) -> Path:
    """A new empty temporary file in out's directory (after removing stale ones there)."""
    remove_stale(out.parent)
    fd, name = tempfile.mkstemp(prefix=f".lminf-{tag}-p{os.getpid()}-", suffix=".tmp", dir=out.parent)
    os.close(fd)
    return Path(name)
