"""Published numbers ("paper" rows) for ``compress report --reported DIR``.

One YAML file per source table (``benchmarks/reported/*.yaml``)::

    source: Ma, Fang, Wang. LLM-Pruner (NeurIPS 2023)
    reference: horseee/LLM-Pruner@128a07d figures/LLaMAResults.png
    table: LLaMA-7B, ~20 % of the parameters removed
    model: llama-7b                      # matched against the suite's model ids
    protocol: PPL at 128 context; lm-eval zero-shot, acc/acc_norm as in the paper
    rows:
      - method: llm_pruner               # registered method name, or dense
        label: Element¹ w/o tune
        target: 80%                      # our target syntax: what remains
        recovery: none                   # "none", or what the paper trained (any other text)
        ppl: {wikitext2: {128: 19.09}}   # source -> context -> perplexity
        tasks: {boolq: 57.06, piqa: 75.68}   # accuracies in PERCENT, as published
        avg: 56.69
        params: 5422977024               # optional: absolute parameters left

A row is shown only in the table of a model whose id equals ``model``, and only where that table has a
cell with the same target and recovery kind (none / some recovery): published numbers are never put
next to a different model or setting. Unknown keys are one-line UsageErrors naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compress.bench.suite import _one_line
from compress.errors import UsageError

__all__ = ["ReportedRow", "ReportedTable", "load_reported"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReportedRow(_Strict):
    method: str = Field(min_length=1)
    label: str = Field(min_length=1)
    target: str
    recovery: str = "none"
    ppl: dict[str, dict[int, float]] = Field(default_factory=dict)
    tasks: dict[str, float] = Field(default_factory=dict, description="percent, as published")
    avg: float | None = None
    params: int | None = Field(None, ge=1)

    @field_validator("target", mode="before")
    @classmethod
    def _target(cls, v: Any) -> str:
        from compress.target import Target

        try:
            return str(Target.parse(str(v)))
        except UsageError as e:
            raise ValueError(str(e)) from None

    @property
    def recovered(self) -> bool:
        return self.recovery.strip().lower() != "none"


class ReportedTable(_Strict):
    source: str = Field(min_length=1)
    reference: str = ""
    table: str = Field(min_length=1)
    model: str = Field(min_length=1)
    protocol: str = ""
    notes: str = ""
    rows: list[ReportedRow] = Field(min_length=1)
    file: str = ""

    def pseudo_records(self) -> list[dict[str, Any]]:
        """Each row as a record-shaped dict the report can render (``_paper`` marks it)."""
        out = []
        for r in self.rows:
            out.append({
                "_paper": {"source": self.source, "table": self.table, "recovery": r.recovery,
                           "recovered": r.recovered, "file": self.file},
                "status": "ok",
                "method": r.method,
                "label": f"*paper*: {r.label}",
                "target": r.target,
                "model": {"id": self.model},
                "recovery": {"tokens": 1 if r.recovered else 0},
                "achieved": {"params": r.params} if r.params else {},
                "ppl": {s: {str(n): {"ppl": v} for n, v in by.items()} for s, by in r.ppl.items()},
                "tasks": {t: {"score": v / 100.0} for t, v in r.tasks.items()},
                "accuracy_avg": r.avg / 100.0 if r.avg is not None else None,
            })
        return out




def load_reported(path: str | Path) -> list[ReportedTable]:
    """Every reported table in ``path`` (a YAML file, or a folder of ``*.yaml``, in name order)."""
    from compress.io.limits import MAX_RECIPE_BYTES
    from compress.io.safe_io import parse_yaml, read_text

    p = Path(path)
    files = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
    if not p.exists() or not files:
        raise UsageError(f"--reported {path}: no reported-numbers YAML there")
    tables = []
    for f in files:
        data = parse_yaml(read_text(f, MAX_RECIPE_BYTES, "reported file"), f"reported file {f}")
        if not isinstance(data, dict):
            raise UsageError(f"reported file {f} must hold a mapping (source, table, model, rows)")
        try:
            tables.append(ReportedTable.model_validate({**data, "file": f.name}))
        except ValidationError as e:
            raise UsageError(f"reported file {f}: {_one_line(e)}") from None
    return tables
