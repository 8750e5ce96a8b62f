"""Benchmark suites (``compress bench``) and reports (``compress report``).

* :mod:`compress.bench.suite` — the suite YAML schema and its cells (stable cell ids);
* :mod:`compress.bench.cell` — one cell in its own process (``python -m compress.bench.cell``);
* :mod:`compress.bench.runner` — runs a suite, resumable, one JSON record line per cell;
* :mod:`compress.bench.record` — the record schema;
* :mod:`compress.bench.report` — markdown / JSON / CSV / PNG from records.
"""

from __future__ import annotations

from compress.bench.record import RECORD_KEYS, SCHEMA, read_records
from compress.bench.runner import BenchSummary, run_suite
from compress.bench.suite import DENSE, Cell, Suite, load_suite

__all__ = ["DENSE", "RECORD_KEYS", "SCHEMA", "BenchSummary", "Cell", "Suite", "load_suite", "read_records",
           "run_suite"]
