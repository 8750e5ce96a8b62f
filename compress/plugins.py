"""Plugin discovery: pluggy over the ``compress`` entry-point group, one entry point at a time.

A plugin that fails to import, whose hooks raise, or that registers a method name already taken is
recorded (name, distribution, version, error) and skipped; every other plugin and command keeps
working. A method that raises an unexpected exception while it runs (``Registry.reported``) is reported
in one line with its plugin's name and distribution. ``COMPRESS_STRICT_PLUGINS=1`` re-raises instead (for plugin authors and CI). The project's own
distributions (``compress-*``) load first, so a third-party plugin cannot take a built-in method name.

Environment:

* ``COMPRESS_PLUGINS=a,b``          load only these entry points (by entry-point name or distribution)
* ``COMPRESS_DISABLE_PLUGINS=a,b``  never load these
* ``COMPRESS_STRICT_PLUGINS=1``     a broken plugin is an error
"""

from __future__ import annotations

import difflib
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

import compress.hookspecs as hookspecs
from compress.errors import CompressError, PluginError, Unsupported, UsageError, one_line_validation
from compress.model.adapter import ArchAdapter, install_resolver
from compress.pruner import Pruner

GROUP = "compress"


@dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    value: str
    status: str = "loaded"  # loaded | failed | blocked
    error: str | None = None
    methods: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


class _BuiltinArchitectures:
    @hookspecs.hookimpl
    def register_architectures(self, register):
        register(ArchAdapter)


def _env_set(name: str) -> set[str]:
    return {s.strip() for s in os.environ.get(name, "").split(",") if s.strip()}


def _strict() -> bool:
    return os.environ.get("COMPRESS_STRICT_PLUGINS", "") not in ("", "0", "false", "no")


class Registry:
    """Methods and architecture adapters contributed by the core and by plugins."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.pruners: dict[str, type[Pruner]] = {}
        self.aliases: dict[str, str] = {}
        self.origin: dict[str, PluginInfo] = {}
        self.architectures: dict[str, type[ArchAdapter]] = {}
        self.plugins: list[PluginInfo] = []
        builtin = PluginInfo("compress-core", "compress", _version("compress"), "compress.plugins")
        self._add(_BuiltinArchitectures(), builtin)
        if load_entry_points:
            for ep in sorted(entry_points(group=GROUP), key=_load_order):
                self.load_entry_point(ep)

    # ------------------------------------------------------------------ loading
    def load_entry_point(self, ep: EntryPoint) -> PluginInfo:
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None, ep.value)
        self.plugins.append(info)
        only, blocked = _env_set("COMPRESS_PLUGINS"), _env_set("COMPRESS_DISABLE_PLUGINS")
        keys = {ep.name, info.distribution or ""}
        if (only and not keys & only) or keys & blocked:
            info.status = "blocked"
            return info
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the tool
            return self._fail(info, f"import failed: {type(e).__name__}: {e}", e)
        self._add(obj, info)
        return info

    def _add(self, obj: Any, info: PluginInfo) -> None:
        staged: dict[str, type[Pruner]] = {}
        staged_alias: dict[str, str] = {}
        staged_arch: dict[str, type[ArchAdapter]] = {}

        def reg_pruner(cls: type[Pruner], aliases: tuple[str, ...] | list[str] = ()) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Pruner)) or not cls.name:
                raise PluginError(f"{cls!r} is not a Pruner subclass with a name")
            for n in (cls.name, *aliases):
                if n in self.pruners or n in self.aliases or n in staged or n in staged_alias:
                    owner = self.origin.get(self.aliases.get(n, n))
                    raise PluginError(
                        f"method name {n!r} is already registered by {owner.name if owner else 'another plugin'}"
                    )
            staged[cls.name] = cls
            for a in aliases:
                staged_alias[a] = cls.name

        def reg_arch(cls: type[ArchAdapter]) -> None:
            for t in cls.model_types:
                staged_arch[t] = cls

        try:
            self.pm.register(obj, name=f"{info.name}:{id(obj)}")
        except Exception as e:  # noqa: BLE001
            return self._fail(info, f"registration failed: {type(e).__name__}: {e}", e)
        try:
            for hook, fn in ((self.pm.hook.register_pruners, reg_pruner),
                             (self.pm.hook.register_architectures, reg_arch)):
                for impl in hook.get_hookimpls():
                    if impl.plugin is obj:
                        impl.function(*([fn] if "register" in impl.argnames else []))
        except Exception as e:  # noqa: BLE001
            self.pm.unregister(obj)
            return self._fail(info, f"registration failed: {type(e).__name__}: {e}", e)
        self.pruners.update(staged)
        self.aliases.update(staged_alias)
        self.architectures.update(staged_arch)
        for n in staged:
            self.origin[n] = info
        info.methods = sorted(staged)

    def _fail(self, info: PluginInfo, msg: str, exc: BaseException) -> None:
        info.status = "failed"
        info.error = msg
        if _strict():
            raise PluginError(f"plugin {info.name!r} ({info.distribution or '?'}): {msg}") from exc
        info.traceback = traceback.format_exc()  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ lookups
    def get(self, name: str) -> type[Pruner]:
        key = self.aliases.get(name, name)
        if key in self.pruners:
            return self.pruners[key]
        known = sorted(set(self.pruners) | set(self.aliases))
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        failed = [p.name for p in self.plugins if p.status == "failed"]
        extra = f" (plugins that failed to load: {', '.join(failed)}; see `compress plugins`)" if failed else ""
        raise UsageError(f"unknown method {name!r}; {hint}known methods: {', '.join(known) or 'none'}{extra}")

    def make(self, method: str, settings: dict[str, Any] | None = None) -> Pruner:
        """The method ``method`` with ``settings`` validated (unknown keys and wrong types are usage errors)."""
        from pydantic import ValidationError

        cls = self.get(method)
        try:
            return cls(settings or {})
        except ValidationError as e:
            fields = ", ".join(sorted(cls.Config.model_fields))
            raise UsageError(f"bad settings for {cls.name}: {one_line_validation(e, 'settings')} "
                             f"(valid keys: {fields})") from None

    def check_model_type(self, model_type: str | None) -> None:
        """Refuse an architecture no adapter knows (before any weight is loaded, when possible)."""
        if model_type not in self.architectures:
            raise Unsupported(
                f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(self.architectures))} "
                "(a plugin can add one through the register_architectures hook)"
            )

    def adapter_for(self, model: Any) -> ArchAdapter:
        """The registered adapter for ``model.config.model_type`` (the one resolution every stage uses:
        :func:`compress.model.adapter.adapter_for` asks the process-wide registry)."""
        mt = getattr(model.config, "model_type", None)
        self.check_model_type(mt)
        return self.architectures[mt](model)

    @contextmanager
    def reported(self, method: str, stage: str) -> Iterator[None]:
        """Run a method's code (``check``, ``plan_shapes``, ``prune``); an exception that is not a
        :class:`~compress.errors.CompressError` is a bug in that plugin: it becomes a one-line
        :class:`PluginError` naming the method, its entry point and distribution, so the user knows whom
        to tell (``-v`` shows the original traceback). ``COMPRESS_STRICT_PLUGINS=1`` re-raises it as is."""
        try:
            yield
        except CompressError:
            raise
        except Exception as e:
            if _strict():
                raise
            info = self.origin.get(self.aliases.get(method, method))
            where = (f"plugin {info.name!r} ({info.distribution or '?'} {info.version or '?'})" if info
                     else "an unregistered plugin")
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise PluginError(
                f"method {method!r} from {where} failed in {stage}(): {type(e).__name__}: {first[:200]}; this is a "
                "bug in that plugin: report it to its authors (-v shows the traceback); other methods still work"
            ) from e

    def methods_table(self) -> list[dict[str, Any]]:
        rows = []
        for n, cls in sorted(self.pruners.items()):
            info = self.origin[n]
            rows.append({
                "name": n,
                "aliases": sorted(a for a, t in self.aliases.items() if t == n),
                "distribution": info.distribution,
                "version": info.version,
                **cls.capabilities.to_dict(),
            })
        return rows


def _load_order(ep: EntryPoint) -> tuple[bool, str]:
    """The project's own distributions (``compress``, ``compress-*``) first, then by entry-point name:
    names are first come, first served, so a third-party plugin cannot take a built-in method's name."""
    dist = getattr(getattr(ep, "dist", None), "name", None) or ""
    first_party = dist.lower().replace("_", "-") == "compress" or dist.lower().replace("_", "-").startswith("compress-")
    return (not first_party, ep.name)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


_REGISTRY: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry (entry points are loaded once)."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = Registry()
    return _REGISTRY


def adapter_for(model: Any) -> ArchAdapter:
    """The architecture adapter of ``model`` from the process-wide registry."""
    return get_registry().adapter_for(model)


install_resolver(adapter_for)
