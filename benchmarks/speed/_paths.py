"""Puts ``benchmarks/lib`` (the benchmarks' shared library: ``bench_common``, ``faithfulness_lib``) on
``sys.path``; a benchmark script imports this before them."""

import sys
from pathlib import Path

COMMON = str(Path(__file__).resolve().parents[1] / "lib")
if COMMON not in sys.path:
    sys.path.insert(0, COMMON)
