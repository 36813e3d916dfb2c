"""A seeded slice of scripts/fuzz_server.py against a real `lminf serve` process (a tiny model): every malformed
or hostile request gets an answer (2xx, 4xx, 501 for a method HTTP does not define) or a close, never a 500, a
hang or a dead server. `python scripts/fuzz_server.py 5000` is the long run (docs/RELIABILITY.md)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

_spec = importlib.util.spec_from_file_location("fuzz_server", Path(__file__).resolve().parents[1] / "scripts" /
                                               "fuzz_server.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


def test_fuzzed_requests_slice():
    results = fuzz.run(300, seed=5, timeout=30.0, log=lambda s: None)
    counts = Counter(o for _, o in results)
    assert not [r for r in results if r[1] in fuzz.FAILURES], counts
    assert counts["4xx"] >= 100 and counts["2xx"] >= 1, counts
