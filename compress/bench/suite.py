"""Benchmark suites: the YAML schema, its expansion into cells, and stable cell ids.

A suite is models × methods (with settings) × targets × recovery budgets × seeds, evaluated with
one protocol. Every combination is a :class:`Cell`; one ``dense`` cell per model (no pruning) is
always added, first. Example::

    name: smoke
    models:
      - id: stories260k
        path: ${COMPRESS_ASSETS}/models/stories260k
    methods:
      - random
      - name: transact
        settings: {calib_samples: 8, calib_seq_len: 128}
        calib: tinystories
    targets: ["50%"]
    recovery: [0]                      # token budgets, or {tokens, mode, settings} mappings
    eval:
      ppl: {tinystories: [128]}        # source -> context lengths
      max_windows: 4                   # only the first N windows (quick suites; recorded)
      # max_tokens: 32768              # or: the first N tokens at every context length
      tasks: [piqa, arc_easy]
      limit: 4                         # lm-eval examples per task
      latency: {prompt_len: 64, new_tokens: 16, repeats: 2}

``${VAR}`` in model paths is expanded from the environment. Unknown keys and missing fields are
one-line :class:`~compress.errors.UsageError`\\ s that name the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.errors import UsageError

__all__ = [
    "DENSE",
    "Cell",
    "EvalSpec",
    "LatencySpec",
    "MethodSpec",
    "ModelSpec",
    "RecoverySpec",
    "Suite",
    "cell_id",
    "load_suite",
    "model_hash",
]

#: Pseudo-method of the unpruned reference row.
DENSE = "dense"
#: Target recorded for the dense row.
DENSE_TARGET = "100%"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """One model of the suite. ``path``: HF folder, ``.gguf`` file/folder, or hub id (``${VAR}`` expanded)."""

    id: str = Field(min_length=1, description="short name used in tables and cell ids")
    path: str = Field(min_length=1)
    dtype: str = "float32"


class MethodSpec(_Strict):
    """A method with its settings. ``label`` tells apart two entries of the same method.

    ``recipe``: a recipe file (:mod:`compress.io.recipe`; relative paths from the suite file's folder)
    whose settings the entry's ``settings`` override and whose ``calib`` is the entry's default. The
    suite sets targets, seeds and recovery itself, so a recipe carrying those run keys is refused."""

    name: str = Field(min_length=1)
    label: str | None = None
    recipe: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)
    calib: str | None = Field(None, description="calibration text (default: the recipe's, else the suite's)")

    @property
    def display(self) -> str:
        return self.label or self.name


class RecoverySpec(_Strict):
    """A recovery-training budget after pruning (``tokens: 0`` = no recovery)."""

    tokens: int = Field(0, ge=0)
    mode: Literal["full", "lora"] = "full"
    settings: dict[str, Any] = Field(default_factory=dict)

    def short(self) -> str:
        return "none" if not self.tokens else f"{_short_int(self.tokens)} {self.mode}"


class LatencySpec(_Strict):
    """Arguments of :func:`compress.probes.compare_latency`: a pruned cell is timed interleaved with the
    dense model in its own process (so both see the same machine), at least 5 kept rounds."""

    prompt_len: int = Field(128, ge=1, le=1 << 16)
    new_tokens: int = Field(32, ge=1, le=1 << 14)
    prefill_batch_size: int = Field(8, ge=1, le=1024)
    decode_batch_size: int = Field(1, ge=1, le=1024)
    repeats: int = Field(5, ge=5, le=1000, description="kept rounds (median and IQR need at least 5)")
    warmup: int = Field(1, ge=0, le=100)


class EvalSpec(_Strict):
    """The evaluation protocol of every cell."""

    ppl: dict[str, list[int]] = Field(default_factory=lambda: {"wikitext2": [2048, 128]},
                                      description="perplexity source -> context lengths")
    max_windows: int | None = Field(None, ge=1, description="only the first N windows per context")
    max_tokens: int | None = Field(None, ge=2, description="only the first N tokens per context "
                                   "(max_tokens // context windows; with max_windows the smaller count)")
    ppl_batch_size: int | None = Field(None, ge=1, description="windows per forward (default: 2048 // len)")
    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks (compress.evaluate names)")
    limit: int | float | None = Field(None, gt=0, description="lm-eval examples per task (int) or fraction")
    batch_size: int = Field(8, ge=1, description="lm-eval batch size")
    latency: LatencySpec | None = Field(default_factory=LatencySpec)

    @field_validator("ppl")
    @classmethod
    def _lengths(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        for source, lengths in v.items():
            if not lengths or any(int(n) < 2 for n in lengths):
                raise ValueError(f"ppl.{source} needs context lengths >= 2")
        return v

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | float | None) -> int | float | None:
        if isinstance(v, float) and v >= 1:
            if v != int(v):
                raise ValueError("limit is a count (integer) or a fraction below 1")
            return int(v)
        return v


class Suite(_Strict):
    """A benchmark suite (see the module docstring for the YAML form)."""

    name: str = Field(min_length=1)
    description: str = ""
    models: list[ModelSpec] = Field(min_length=1)
    methods: list[MethodSpec] = Field(min_length=1)
    targets: list[str] = Field(min_length=1)
    recovery: list[RecoverySpec] = Field(default_factory=lambda: [RecoverySpec()])
    eval: EvalSpec = Field(default_factory=EvalSpec)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    calib: str | None = Field(None, description="default calibration text (compress run's default if unset)")
    threads: int | None = Field(None, ge=1, description="torch threads per cell (default: torch's)")
    timeout_s: float | None = Field(None, gt=0, description="wall-clock limit per cell")

    @field_validator("methods", mode="before")
    @classmethod
    def _method_shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"name": m} if isinstance(m, str) else m for m in v]
        return v

    @field_validator("recovery", mode="before")
    @classmethod
    def _recovery_shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"tokens": r} if isinstance(r, int) and not isinstance(r, bool) else r for r in v]
        return v

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if isinstance(v, list):
            from compress.target import Target

            out = []
            for t in v:
                try:
                    out.append(str(Target.parse(str(t))))
                except UsageError as e:
                    raise ValueError(str(e)) from None
            return out
        return v

    @model_validator(mode="after")
    def _check(self) -> Suite:
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique, got {ids}")
        for m in self.methods:
            if m.name == DENSE and (m.settings or m.calib or m.recipe):
                raise ValueError("the dense row takes no settings, recipe or calib")
        labels = [m.display for m in self.methods if m.name != DENSE]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"method {twice[0]!r} is listed twice; give each entry its own label")
        return self

    # ------------------------------------------------------------------ cells
    def cells(self, methods: list[str] | None = None, models: list[str] | None = None,
              recovery: list[int] | None = None, targets: list[str] | None = None) -> list[Cell]:
        """Every cell, dense first per model. ``methods``/``models``/``recovery``/``targets`` keep only
        those (by method name or label, model id, recovery token budget, target); with ``methods`` the
        dense row is kept only if ``dense`` is among them (``targets`` never drops it)."""
        from compress.target import Target

        pick_targets = None
        if targets:
            try:
                pick_targets = {str(Target.parse(t)) for t in targets}
            except UsageError as e:
                raise UsageError(f"--targets: {e}") from None
            unknown_t = pick_targets - set(self.targets)
            if unknown_t:
                raise UsageError(f"no target {sorted(unknown_t)[0]!r} in suite {self.name}; "
                                 f"targets: {', '.join(self.targets)}")
        pick_methods = set(methods) if methods else None
        pick_models = set(models) if models else None
        if pick_models:
            unknown = pick_models - {m.id for m in self.models}
            if unknown:
                raise UsageError(f"no model {sorted(unknown)[0]!r} in suite {self.name}; "
                                 f"models: {', '.join(m.id for m in self.models)}")
        if pick_methods:
            known = {DENSE} | {m.name for m in self.methods} | {m.display for m in self.methods}
            unknown = pick_methods - known
            if unknown:
                raise UsageError(f"no method {sorted(unknown)[0]!r} in suite {self.name}; "
                                 f"methods: {', '.join(sorted(known))}")
        if recovery is not None:
            unknown_budget = set(recovery) - {r.tokens for r in self.recovery}
            if unknown_budget:
                raise UsageError(f"no recovery budget {sorted(unknown_budget)[0]} in suite {self.name}; "
                                 f"budgets: {', '.join(str(r.tokens) for r in self.recovery)}")
        eval_doc = self.eval.model_dump(mode="json")
        out: list[Cell] = []
        seen: dict[str, Cell] = {}
        for model in self.models:
            if pick_models and model.id not in pick_models:
                continue
            mdoc = resolve_model(model)
            todo: list[tuple[MethodSpec, str, RecoverySpec, int]] = []
            if not pick_methods or DENSE in pick_methods:
                todo.append((MethodSpec(name=DENSE), DENSE_TARGET, RecoverySpec(), self.seeds[0]))
            for seed in self.seeds:
                for method in self.methods:
                    if method.name == DENSE:
                        continue
                    if pick_methods and not {method.name, method.display} & pick_methods:
                        continue
                    for target in self.targets:
                        if pick_targets and target not in pick_targets:
                            continue
                        for rec in self.recovery:
                            if recovery is not None and rec.tokens not in recovery:
                                continue
                            todo.append((method, str(Target.parse(target)), rec, seed))
            for method, target, rec, seed in todo:
                cell = Cell(
                    suite=self.name, model=mdoc, method=method.name, label=method.display,
                    settings=dict(method.settings),
                    calib=None if method.name == DENSE else (method.calib or self.calib),
                    target=target, recovery=rec.model_dump(mode="json"), eval=eval_doc, seed=seed,
                    threads=self.threads, timeout_s=self.timeout_s,
                )
                if cell.id in seen:
                    raise UsageError(f"suite {self.name}: two cells are identical ({cell.describe()}); "
                                     "give one of the method entries different settings")
                seen[cell.id] = cell
                out.append(cell)
        return out


class Cell(BaseModel):
    """One isolated benchmark run: a model, a method with settings, a target, a recovery budget."""

    model_config = ConfigDict(extra="forbid")

    suite: str
    model: dict[str, Any]  # id, path, dtype, hash, hash_of
    method: str
    label: str
    settings: dict[str, Any]
    calib: str | None
    target: str
    recovery: dict[str, Any]
    eval: dict[str, Any]
    seed: int
    threads: int | None = None
    timeout_s: float | None = None

    @property
    def id(self) -> str:
        return cell_id(self)

    def describe(self) -> str:
        rec = RecoverySpec(**self.recovery).short()
        return f"{self.model['id']} · {self.label} · {self.target} · recovery {rec} · seed {self.seed}"


def cell_id(cell: Cell) -> str:
    """Stable id: sha256 over model (id, dtype, hash), method, settings, calib, target, recovery,
    eval protocol and seed (16 hex digits). The model path, label, threads and timeout do not count."""
    key = {
        "model": {k: cell.model.get(k) for k in ("id", "dtype", "hash")},
        "method": cell.method,
        "settings": cell.settings,
        "calib": cell.calib,
        "target": cell.target,
        "recovery": cell.recovery,
        "eval": cell.eval,
        "seed": cell.seed,
    }
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- models


def expand_vars(text: str, where: str) -> str:
    """``${VAR}`` / ``$VAR`` from the environment; an unset variable is a one-line UsageError."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        value = os.environ.get(name)
        if value is None:
            raise UsageError(f"{where} uses ${{{name}}} but {name} is not set")
        return value

    return os.path.expanduser(_VAR.sub(sub, text))


def resolve_model(model: ModelSpec) -> dict[str, Any]:
    """The model entry of a cell: expanded path plus a cheap, stable content hash."""
    path = expand_vars(model.path, f"model {model.id!r}")
    p = Path(path)
    local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if local and not p.exists():
        raise UsageError(f"model {model.id!r}: path {path} does not exist")
    digest, what = model_hash(path)
    return {"id": model.id, "path": str(p.resolve()) if p.exists() else path, "dtype": model.dtype,
            "hash": digest, "hash_of": what}


def model_hash(path: str) -> tuple[str | None, str | None]:
    """``(sha256 hex, what was hashed)`` for a model: the GGUF header (metadata and tensor table,
    no tensor data) when the model loads from a GGUF, else its ``config.json``; ``(None, None)`` for
    a hub id. Cheap (no weights are read) and stable across copies of the same files."""
    from compress.io.loading import _gguf_in

    p = Path(path)
    if not p.exists():
        return None, None
    gguf = _gguf_in(p)
    if gguf is not None:
        return _gguf_header_sha256(gguf)
    cfg = p / "config.json" if p.is_dir() else p
    if cfg.is_file():
        return hashlib.sha256(cfg.read_bytes()).hexdigest(), cfg.name
    return None, None


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_header_sha256(path: Path) -> tuple[str, str]:
    """sha256 of a GGUF file's header: magic, version, metadata and tensor infos (v2/v3 layout),
    read sequentially (no tensor data). Falls back to the first MiB if the header does not parse."""

    class _Bad(Exception):
        pass

    h = hashlib.sha256()
    with open(path, "rb") as f:

        def take(n: int) -> bytes:
            b = f.read(n)
            if len(b) != n:
                raise _Bad
            h.update(b)
            return b

        def u32() -> int:
            return struct.unpack("<I", take(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", take(8))[0]

        def value(kind: int) -> None:
            if kind in _GGUF_SCALARS:
                take(_GGUF_SCALARS[kind])
            elif kind == 8:
                take(u64())
            elif kind == 9:
                item, n = u32(), u64()
                if item in _GGUF_SCALARS:
                    take(_GGUF_SCALARS[item] * n)
                else:
                    for _ in range(n):
                        value(item)
            else:
                raise _Bad

        try:
            if take(4) != b"GGUF" or u32() < 2:
                raise _Bad
            n_tensors, n_kv = u64(), u64()
            for _ in range(n_kv):
                take(u64())  # key
                value(u32())
            for _ in range(n_tensors):
                take(u64())  # name
                take(8 * u32())  # dims
                take(4 + 8)  # type, offset
            return h.hexdigest(), "gguf-header"
        except (_Bad, struct.error):
            f.seek(0)
            return hashlib.sha256(f.read(1 << 20)).hexdigest(), "gguf-first-MiB"


# ---------------------------------------------------------------------------------- loading


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown key {loc!r}")
        elif err.get("type") == "missing":
            parts.append(f"missing field {loc!r}")
        else:
            parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_suite(path: str | Path, *, max_windows: int | str | None = None, max_tokens: int | str | None = None,
               limit: int | float | None = None) -> Suite:
    """Read and validate a suite YAML; ``max_windows``/``max_tokens``/``limit`` override its eval
    protocol (they change the cell ids, so quick and full runs never mix; ``"all"`` lifts a window or
    token limit: every window of the text). Every problem is a one-line UsageError."""
    from compress.io.limits import ALL, MAX_RECIPE_BYTES
    from compress.io.safe_io import parse_yaml, read_text

    p = Path(path)
    # bounded, regular files only, no aliases / duplicate keys / deep nesting (as recipes)
    data = parse_yaml(read_text(p, MAX_RECIPE_BYTES, "suite file"), f"suite file {p}")
    if not isinstance(data, dict):
        raise UsageError(f"suite file {p} must hold a mapping (name, models, methods, targets, eval, ...)")
    data.setdefault("name", p.stem)
    try:
        suite = Suite.model_validate(data)
    except ValidationError as e:
        raise UsageError(f"suite file {p}: {_one_line(e)}") from None
    suite.methods = [_with_recipe(m, p) for m in suite.methods]
    from compress.evaluate.harness import resolve_tasks
    from compress.evaluate.perplexity import PPL_DATASETS

    if suite.eval.tasks:
        try:
            resolve_tasks(suite.eval.tasks)
        except UsageError as e:
            raise UsageError(f"suite file {p}: eval.tasks: {e}") from None
    for source in suite.eval.ppl:
        if source not in PPL_DATASETS and not Path(source).expanduser().is_file():
            raise UsageError(f"suite file {p}: eval.ppl: unknown source {source!r}; "
                             f"use one of {', '.join(PPL_DATASETS)} or a text file")
    if max_windows is not None or max_tokens is not None or limit is not None:
        upd: dict[str, Any] = {}
        for key, value in (("max_windows", max_windows), ("max_tokens", max_tokens)):
            if value is not None:
                upd[key] = None if value == ALL else value
        if limit is not None:
            upd["limit"] = int(limit) if float(limit) >= 1 and float(limit) == int(limit) else limit
        try:
            suite.eval = EvalSpec.model_validate({**suite.eval.model_dump(), **upd})
        except ValidationError as e:
            raise UsageError(f"bad evaluation override: {_one_line(e)}") from None
    return suite


def _with_recipe(method: MethodSpec, suite_path: Path) -> MethodSpec:
    """``method`` with its recipe's settings merged under its own (entry wins) and the recipe's calib
    as its default; every problem is a one-line UsageError naming the suite file."""
    if not method.recipe:
        return method
    from compress.io.recipe import load_recipe

    raw = expand_vars(method.recipe, f"suite file {suite_path}: method {method.display!r}")
    path = Path(raw) if Path(raw).is_absolute() else suite_path.parent / raw
    try:
        recipe = load_recipe(path)
        from compress.plugins import get_registry

        registry = get_registry()
        recipe.check_settings(recipe.canonical_method(method.name, registry), registry)
    except UsageError as e:
        raise UsageError(f"suite file {suite_path}: method {method.display!r}: {e}") from None
    fixed = sorted(set(recipe.run) - {"calib"})
    if fixed:
        raise UsageError(f"suite file {suite_path}: recipe {path} sets {fixed[0]!r}; in a suite, targets, "
                         "seeds and recovery come from the suite: remove it from the recipe")
    # the entry's own settings are checked with the cell (preflight), as without a recipe
    return method.model_copy(update={"settings": {**recipe.settings, **method.settings},
                                     "calib": method.calib or recipe.run.get("calib")})


def _short_int(n: int) -> str:
    for suf, m in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= m and n % (m // 10) == 0:
            return f"{n / m:g}{suf}"
    return str(n)
