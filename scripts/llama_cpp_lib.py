#!/usr/bin/env python3
"""llama-cpp-python beside lminf_gguf: keep a working one, give a library-less one the patched library.

`make install` installs llama-cpp-python's Python layer without its native build (lminf_gguf binds that layer
privately to its own library, see lminf_gguf/_lib.py). So that `import llama_cpp` also works on its own, its
empty lib/ then receives a copy of the patched library (a superset of the pinned llama.cpp's API). An
llama-cpp-python that has a library of its own (a CUDA build, say) is never touched.

    python scripts/llama_cpp_lib.py working   # exit 0 if `import llama_cpp` works here (then keep it as it is)
    python scripts/llama_cpp_lib.py provide   # copy the patched library into a library-less llama_cpp/lib
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

MARK = ".lminf_gguf"  # in llama_cpp/lib: the library there is our copy (refreshed on the next install)
NAMES = {"linux": "libllama.so", "darwin": "libllama.dylib", "win32": "llama.dll"}


def llama_cpp_lib_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")
    return Path(spec.origin).parent / "lib" if spec and spec.origin else None


def working() -> bool:
    probe = "import llama_cpp, sys; sys.exit(0 if llama_cpp.__version__ == '0.3.36' else 3)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def provide() -> str:
    dest = llama_cpp_lib_dir()
    if dest is None:
        return "llama-cpp-python is not installed: nothing to do"
    name = next((n for p, n in NAMES.items() if sys.platform.startswith(p)), "libllama.so")
    if (dest / name).exists() and not (dest / MARK).exists():
        return f"llama-cpp-python has its own library in {dest}: kept"
    import lminf_gguf  # noqa: F401  (the patched library must load before it is copied)
    src = Path(lminf_gguf.__file__).parent / "lib"
    dest.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    main = next(src.glob("*llama-lminf.*"))
    shutil.copy2(main, dest / name)  # the name llama_cpp looks for; its dependencies keep our names
    (dest / MARK).write_text("copied by lminf_gguf's install (scripts/llama_cpp_lib.py)\n")
    return f"llama-cpp-python's library-less layer in {dest} now loads the patched library"


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "working":
        sys.exit(0 if working() else 1)
    if cmd == "provide":
        print(provide())
        sys.exit(0)
    sys.exit(__doc__)
