"""The README's methods table lists exactly the methods our distributions register."""

from __future__ import annotations

import re
from pathlib import Path

from compress.plugins import get_registry

README = Path(__file__).resolve().parents[1] / "README.md"
OURS = {"compress-transact", "compress-baselines"}


def _table_methods() -> set[str]:
    text = README.read_text()
    section = text.split("## Methods", 1)[1].split("\n## ", 1)[0]
    return {m.group(1) for m in re.finditer(r"^\| `([a-z_0-9]+)`", section, flags=re.M)}


def test_methods_table_matches_registry():
    reg = get_registry()
    registered = {row["name"] for row in reg.methods_table() if row["distribution"] in OURS}
    failed = [p.name for p in reg.plugins if p.status == "failed" and p.distribution in OURS]
    assert not failed, f"built-in plugins failed to load: {failed}"
    assert _table_methods() == registered


def test_method_family_matrix_matches_registry():
    """The README's method × family table is what `compress families` computes from the registry."""
    reg = get_registry()
    section = README.read_text().split("### Method × family", 1)[1].split("\n#", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    families = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    assert sorted(families) == sorted(t for t in reg.architectures if t != "compress")
    shown = {"✓": "yes", "settings": "settings", "—": "no"}
    table = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0].strip("`")] = dict(zip(families, (shown[c] for c in cells[1:]), strict=True))
    ours = {row["name"] for row in reg.methods_table() if row["distribution"] in OURS}
    assert set(table) == ours
    for name in ours:
        cap = reg.pruners[name].capabilities
        assert table[name] == {f: cap.support(reg.architectures[f]) for f in families}, name


def test_readme_commands_are_the_ci_commands():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    text = README.read_text()
    assert ".venv/bin/python -m pytest -q" in text and ".venv/bin/python -m pytest -q" in ci
    assert '.venv/bin/pip install -c constraints.txt -e ".[dev]" -e ./plugins/transact -e ./baselines' in text
    assert '.venv/bin/pip install -q -c constraints.txt -e ".[dev]" -e ./plugins/transact -e ./baselines' in ci
