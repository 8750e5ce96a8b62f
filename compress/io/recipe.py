"""Recipes: a method and its settings in one YAML (or JSON) file, optionally with run keys.

A recipe is flat::

    method: slicegpt            # which method the settings are for
    calib: wikitext2            # optional run keys (see RUN_KEYS)
    round_to: 8                 # every other key is a setting of that method,
    calib_samples: 128          # validated by the method's Config: unknown keys are refused

``compress run --recipe FILE`` reads it; CLI flags and ``--set`` win over it. A bench suite method entry
may reference one (``recipe: path``, relative to the suite file). Every run writes the **resolved**
recipe — method, every setting after defaults, target, seed, calibration, recovery — next to its output
(:data:`RECIPE_FILE`) and into its record, and that file is itself a valid recipe.

A method's settings therefore must not use the run keys' names (a test checks every registered method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import UsageError
from compress.io.limits import MAX_RECOVER_TOKENS, MAX_SEED

__all__ = ["RECIPE_FILE", "RECOVER_MODES", "RUN_KEYS", "Recipe", "dump_recipe", "load_recipe", "read_mapping", "resolved_recipe"]

#: Name of the resolved recipe written into every output folder.
RECIPE_FILE = "compress_recipe.yaml"

#: Keys of a recipe that configure the run rather than the method, with their types.
RUN_KEYS: dict[str, tuple[type, ...]] = {
    "method": (str,),
    "target": (str, int, float),
    "seed": (int,),
    "calib": (str,),
    "recover_tokens": (int,),
    "recover_mode": (str,),
    "recover_settings": (dict,),
}
#: Bounds of the integer run keys (compress.io.limits).
_RUN_KEY_MAX: dict[str, int] = {"seed": MAX_SEED, "recover_tokens": MAX_RECOVER_TOKENS}
#: Recovery training modes (``RecoveryConfig.mode``): every weight on the LM loss, LoRA adapters merged
#: back, every weight distilled from the dense model.
RECOVER_MODES: tuple[str, ...] = ("full", "lora", "kd")


def read_mapping(path: str | Path, what: str = "recipe") -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON file holding one mapping; every problem is a one-line UsageError.

    Bounded (:mod:`compress.io.safe_io`): a regular file of at most :data:`~compress.io.limits.MAX_RECIPE_BYTES`,
    no YAML aliases/anchors, no duplicate keys, nesting at most :data:`~compress.io.limits.MAX_NESTING` deep,
    no JSON ``NaN``/``Infinity``."""
    from compress.io.limits import MAX_RECIPE_BYTES
    from compress.io.safe_io import parse_json, parse_yaml, read_text

    path = str(path)
    text = read_text(path, MAX_RECIPE_BYTES, f"{what} file")
    where = f"{what} file {path}"
    if path.endswith((".yaml", ".yml")):
        data = parse_yaml(text, where)
    else:
        try:
            data = parse_json(text, where)
        except UsageError as e:
            hint = "; fix it or pass settings with --set key=value" if "not valid JSON" in str(e) else ""
            raise UsageError(f"{e}{hint}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{what} file {path} must hold a mapping (method, settings, optional run keys)")
    return data


@dataclass
class Recipe:
    """A parsed recipe: ``method`` (may be None), run keys present in the file, method settings."""

    source: str | None = None
    method: str | None = None
    run: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> Recipe:
        """Split ``data`` into run keys and settings, checking the run keys' types (one-line errors)."""
        where = f"recipe {source}" if source else "recipe"
        run: dict[str, Any] = {}
        settings: dict[str, Any] = {}
        for key, value in data.items():
            key = str(key)
            if key not in RUN_KEYS:
                settings[key] = value
                continue
            if value is None:
                continue
            types = RUN_KEYS[key]
            if isinstance(value, bool) or not isinstance(value, types):
                names = " or ".join(t.__name__ for t in types)
                raise UsageError(f"{where}: {key} must be a {names}, got {value!r}")
            if key in _RUN_KEY_MAX and not 0 <= value <= _RUN_KEY_MAX[key]:
                raise UsageError(f"{where}: {key} must be in 0..{_RUN_KEY_MAX[key]}, got {value}")
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{where}: {key} must be a finite number, got {value!r}")
            if key == "recover_mode" and value not in RECOVER_MODES:
                raise UsageError(f"{where}: recover_mode must be one of {', '.join(RECOVER_MODES)}, got {value!r}")
            run[key] = str(value) if key == "target" else value
        method = run.pop("method", None)
        return cls(source=source, method=method, run=run, settings=settings)

    def canonical_method(self, method: str | None, registry: Any) -> str | None:
        """The registered name (in ``registry``, a :class:`compress.plugins.Registry`) of ``method``
        (the CLI's) or of the recipe's own; a conflict is refused."""
        reg = registry
        mine = reg.get(self.method).name if self.method else None
        given = reg.get(method).name if method else None
        if mine and given and mine != given:
            raise UsageError(f"recipe {self.source} is for method {mine!r}, not {given!r}; "
                             "drop --method or use a recipe for that method")
        return given or mine

    def check_settings(self, method: str, registry: Any) -> None:
        """Validate the recipe's settings against ``method``'s Config (unknown keys named in one line)."""
        try:
            registry.make(method, self.settings)
        except UsageError as e:
            run_keys = ", ".join(RUN_KEYS)
            raise UsageError(f"recipe {self.source}: {e} (run keys: {run_keys})") from None

    def run_kwargs(self, registry: Any, *, method: str | None = None, target: str | None = None, seed: int | None = None,
                   calib: str | None = None, recover_tokens: int | None = None,
                   recover_mode: str | None = None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """Keyword arguments of :class:`compress.pipeline.run.RunSpec`: the given values (CLI flags, ``--set``)
        win over the recipe's, which win over the defaults. ``method`` and ``target`` are required."""
        name = self.canonical_method(method, registry)
        if not name:
            raise UsageError("--method is required (or a --recipe whose file names its method:)")
        if self.settings:
            self.check_settings(name, registry)
        tgt = target if target is not None else self.run.get("target")
        if tgt is None:
            raise UsageError("--target is required (or a --recipe with target:), e.g. --target 60%")

        def pick(given: Any, key: str, default: Any) -> Any:
            return given if given is not None else self.run.get(key, default)

        return {
            "method": name,
            "target": str(tgt),
            "seed": pick(seed, "seed", 0),
            "calib": pick(calib, "calib", None),
            "recover_tokens": pick(recover_tokens, "recover_tokens", 0),
            "recover_mode": pick(recover_mode, "recover_mode", "full"),
            "recover_settings": dict(self.run.get("recover_settings") or {}),
            "settings": {**self.settings, **(settings or {})},
        }


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file (YAML or JSON). The method's settings are checked when the method is known."""
    return Recipe.from_dict(read_mapping(path), source=str(path))


def resolved_recipe(method: str, config: dict[str, Any], *, target: str, seed: int, calib: str | None,
                    recover_tokens: int = 0, recover_mode: str = "full",
                    recover_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe that reproduces a run: run keys first, then every setting after defaults.
    ``calib`` is the calibration spec actually used (None when the run read no calibration text)."""
    doc: dict[str, Any] = {"method": method, "target": target, "seed": seed, "calib": calib,
                           "recover_tokens": recover_tokens, "recover_mode": recover_mode}
    if recover_settings:
        doc["recover_settings"] = dict(recover_settings)
    clash = sorted(set(config) & set(RUN_KEYS))
    if clash:
        raise UsageError(f"method {method} has a setting named like a run key ({clash[0]}); rename it")
    doc.update(config)
    return doc


def dump_recipe(doc: dict[str, Any]) -> str:
    """YAML text of a resolved recipe (key order kept), with a header saying how to re-use it."""
    import yaml

    head = ("# Resolved recipe of this run (every setting after defaults). Re-run it with\n"
            "#   compress run --recipe compress_recipe.yaml --model MODEL --out OUT\n")
    return head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, allow_unicode=True)
