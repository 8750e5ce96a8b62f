"""Plugin discovery: pluggy over the ``compress`` entry-point group, one entry point at a time.

Who is built in. Exactly the distributions this project ships are built in, by their exact
(normalized) name: ``compress`` (the core), ``compress-transact`` and ``compress-baselines``
(:data:`BUILTIN_DISTRIBUTIONS`); every other distribution is third-party, whatever its name
(``compress-evil``, the example ``compress-wanda-sp``). A name alone proves little, so a distribution
that claims a built-in name must also show it ships the code that would run: every one of its
entry points lies inside the project's package for that name (``compress_transact.*``), and that
package, as the import system would find it (without importing it), is one of the distribution's own
installed files (its ``RECORD``) or lies under the source tree of an editable install (its
``direct_url.json``). A claimant that fails the check is refused, never loaded, and reported; the first
copy on ``sys.path`` that passes is the built-in one. Limits: package metadata is only files on disk,
so a distribution installed *in place of* ours under our exact name, with its own ``compress_transact``
package, cannot be told apart (install the project's distributions from its source); a distribution
without any file list (no ``RECORD``, no ``direct_url.json``) is taken at its name; and a plugin is code
running in this process: these rules stop name-level takeovers, not a plugin that patches other
modules at import.

Names. Built-ins load first, then third-party plugins by entry-point name. Method names, aliases and
architecture adapters (``model_types``) are first come, first served, so no third-party plugin can
shadow a built-in one, and of two third-party plugins claiming the same name the first keeps it. A
plugin that tries to register a taken name, or a class that breaks the contract (a ``Pruner`` whose
``name`` is not a short identifier-like string, whose ``capabilities`` is not a :class:`Capabilities`,
or whose ``Config`` is not a pydantic model; an ``ArchAdapter`` without a tuple of ``model_types``) is
refused as a whole: nothing of it is registered (all or nothing, as for a hook that raises) and it is
listed by ``compress plugins`` as failed, with the conflict and the name's owner. The reservation covers
what the built-ins registered in this process: a built-in blocked by ``COMPRESS_PLUGINS`` /
``COMPRESS_DISABLE_PLUGINS``, or one that failed to import, reserves nothing.

Failures. A plugin that fails to import or whose hooks raise — anything, ``SystemExit``,
``KeyboardInterrupt`` and ``GeneratorExit`` included (a Ctrl-C pressed while a plugin is being imported
reads the same as a plugin raising ``KeyboardInterrupt`` and is recorded as that plugin's failure) — is
recorded (name, distribution, version, error) and skipped; every other plugin and command keeps
working. A method that raises an unexpected exception while it runs (``Registry.reported``), or a
plugin's adapter that raises while :meth:`Registry.adapter_for` builds it, is reported in one line with
its plugin's name and distribution. ``COMPRESS_STRICT_PLUGINS=1`` re-raises instead, as a
:class:`PluginError` (for plugin authors and CI).

Environment:

* ``COMPRESS_PLUGINS=a,b``          load only these entry points (by entry-point name or distribution)
* ``COMPRESS_DISABLE_PLUGINS=a,b``  never load these
* ``COMPRESS_STRICT_PLUGINS=1``     a broken plugin is an error
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import importlib.util
import json
import os
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import Distribution, EntryPoint
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pluggy

import compress.hookspecs as hookspecs
from compress.errors import CompressError, PluginError, Unsupported, UsageError, one_line_validation
from compress.model.adapter import ArchAdapter, install_resolver
from compress.pruner import Capabilities, Pruner

GROUP = "compress"

#: The distributions this project ships (normalized name → the top-level package their code lives in).
BUILTIN_DISTRIBUTIONS: dict[str, str] = {
    "compress": "compress",
    "compress-transact": "compress_transact",
    "compress-baselines": "compress_baselines",
}

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_EXPORTS = ("stock", "compress", "auto")


@dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    value: str
    status: str = "loaded"  # loaded | failed | blocked
    error: str | None = None
    methods: list[str] = field(default_factory=list)
    builtin: bool = False
    architectures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class Candidate:
    """An entry point found by :func:`discover`, with the verdict on its distribution's provenance:
    ``builtin`` when it is one of ours, ``refused`` (why) when it claims to be and is not."""

    ep: EntryPoint | None  # None: the distribution's entry_points.txt could not be parsed
    name: str
    distribution: str | None
    version: str | None
    value: str
    builtin: bool = False
    refused: str | None = None


class _BuiltinArchitectures:
    @hookspecs.hookimpl
    def register_architectures(self, register):
        register(ArchAdapter)


def _env_set(name: str) -> set[str]:
    return {s.strip() for s in os.environ.get(name, "").split(",") if s.strip()}


def _strict() -> bool:
    return os.environ.get("COMPRESS_STRICT_PLUGINS", "") not in ("", "0", "false", "no")


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters), never raising itself."""
    try:
        text = str(exc).strip()
    except Exception:  # noqa: BLE001 - a plugin's exception may not even print
        text = "<unprintable>"
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _owner(info: PluginInfo | None) -> str:
    if info is None:
        return "another plugin"
    return f"{info.name} ({info.distribution or '?'}{', built-in' if info.builtin else ''})"


def _where(info: PluginInfo | None) -> str:
    return (f"plugin {info.name!r} ({info.distribution or '?'} {info.version or '?'})" if info
            else "an unregistered plugin")


class Registry:
    """Methods and architecture adapters contributed by the core and by plugins."""

    def __init__(self, load_entry_points: bool = True):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.pruners: dict[str, type[Pruner]] = {}
        self.aliases: dict[str, str] = {}
        self.origin: dict[str, PluginInfo] = {}
        self.architectures: dict[str, type[ArchAdapter]] = {}
        self.arch_origin: dict[str, PluginInfo] = {}
        self.plugins: list[PluginInfo] = []
        builtin = PluginInfo("compress-core", "compress", _version("compress"), "compress.plugins", builtin=True)
        self._add(_BuiltinArchitectures(), builtin)
        if load_entry_points:
            for cand in discover():
                self._load(cand)

    # ------------------------------------------------------------------ loading
    def load_entry_point(self, ep: EntryPoint) -> PluginInfo:
        """Load one entry point; its distribution's provenance decides whether it is built in."""
        return self._load(_classify(ep))

    def _load(self, cand: Candidate) -> PluginInfo:
        info = PluginInfo(cand.name, cand.distribution, cand.version, cand.value, builtin=cand.builtin)
        self.plugins.append(info)
        only, blocked = _env_set("COMPRESS_PLUGINS"), _env_set("COMPRESS_DISABLE_PLUGINS")
        keys = {cand.name, info.distribution or ""}
        if (only and not keys & only) or keys & blocked:
            info.status = "blocked"
            return info
        if cand.refused is not None or cand.ep is None:
            self._fail(info, f"refused: {cand.refused or 'no entry point'}", None)
            return info
        try:
            obj = cand.ep.load()
        except BaseException as e:  # noqa: BLE001 - SystemExit / KeyboardInterrupt from a plugin must not end the tool
            self._fail(info, f"import failed: {_describe(e)}", e)
            return info
        self._add(obj, info)
        return info

    def _add(self, obj: Any, info: PluginInfo) -> None:
        """Register ``obj``'s hooks for ``info``: all of it, or (refused or raising) nothing."""
        staged: dict[str, type[Pruner]] = {}
        staged_alias: dict[str, str] = {}
        staged_arch: dict[str, type[ArchAdapter]] = {}
        refusals: list[str] = []  # kept even if the plugin swallows the PluginError we raise
        open_ = [True]

        def refuse(msg: str) -> None:
            refusals.append(msg)
            raise PluginError(msg)

        def reg_pruner(cls: type[Pruner], aliases: tuple[str, ...] | list[str] = ()) -> None:
            if not open_[0]:
                refuse("register() called after registration ended")
            problem = _pruner_problem(cls, aliases)
            if problem:
                refuse(problem)
            for n in (cls.name, *aliases):
                if n in staged or n in staged_alias:
                    refuse(f"method name {n!r} is registered twice by this plugin")
                if n in self.pruners or n in self.aliases:
                    owner = self.origin.get(self.aliases.get(n, n))
                    why = ": a plugin cannot replace a built-in method" if owner and owner.builtin else ""
                    refuse(f"method name {n!r} is already registered by {_owner(owner)}{why}")
            staged[cls.name] = cls
            for a in aliases:
                staged_alias[a] = cls.name

        def reg_arch(cls: type[ArchAdapter]) -> None:
            if not open_[0]:
                refuse("register() called after registration ended")
            problem = _adapter_problem(cls)
            if problem:
                refuse(problem)
            for t in cls.model_types:
                if staged_arch.get(t, cls) is not cls:
                    refuse(f"architecture {t!r} is registered twice by this plugin")
                if t in self.architectures:
                    owner = self.arch_origin.get(t)
                    why = ": a plugin cannot replace a built-in adapter" if owner and owner.builtin else ""
                    refuse(f"architecture {t!r} is already handled by {_owner(owner)}{why}")
                staged_arch[t] = cls

        try:
            self.pm.register(obj, name=f"{info.name}:{id(obj)}")
        except BaseException as e:  # noqa: BLE001
            return self._fail(info, f"registration failed: {_describe(e)}", e)
        error: BaseException | None = None
        try:
            for hook, fn in ((self.pm.hook.register_pruners, reg_pruner),
                             (self.pm.hook.register_architectures, reg_arch)):
                for impl in hook.get_hookimpls():
                    if impl.plugin is obj:
                        impl.function(*([fn] if "register" in impl.argnames else []))
        except BaseException as e:  # noqa: BLE001 - SystemExit / KeyboardInterrupt from a hook included
            error = e
        finally:
            open_[0] = False
        if error is not None or refusals:
            with contextlib.suppress(Exception):  # already half gone: nothing more to undo
                self.pm.unregister(obj)
            if refusals:
                return self._fail(info, f"registration refused: {refusals[0]}", error)
            assert error is not None
            return self._fail(info, f"registration failed: {_describe(error)}", error)
        self.pruners.update(staged)
        self.aliases.update(staged_alias)
        self.architectures.update(staged_arch)
        for n in staged:
            self.origin[n] = info
        for t in staged_arch:
            self.arch_origin[t] = info
        info.methods = sorted(staged)
        info.architectures = sorted(staged_arch)

    def _fail(self, info: PluginInfo, msg: str, exc: BaseException | None) -> None:
        info.status = "failed"
        info.error = msg
        if _strict():
            raise PluginError(f"plugin {info.name!r} ({info.distribution or '?'}): {msg}") from exc
        if exc is not None:
            info.traceback = "".join(traceback.format_exception(exc))  # type: ignore[attr-defined]

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
        :func:`compress.model.adapter.adapter_for` asks the process-wide registry). An adapter from a
        third-party plugin that raises anything but a :class:`CompressError` while it is built is
        reported as a :class:`PluginError` naming that plugin (strict mode re-raises it as is)."""
        mt = getattr(model.config, "model_type", None)
        self.check_model_type(mt)
        cls = self.architectures[mt]
        info = self.arch_origin.get(mt)
        if info is not None and info.builtin:
            return cls(model)
        try:
            return cls(model)
        except CompressError:
            raise
        except Exception as e:
            if _strict():
                raise
            raise PluginError(
                f"adapter {getattr(cls, '__name__', cls)!r} for {mt!r} from {_where(info)} failed: {_describe(e)}; "
                "this is a bug in that plugin: report it to its authors (-v shows the traceback) or disable it "
                f"with COMPRESS_DISABLE_PLUGINS={info.name if info else '...'}"
            ) from e

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
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise PluginError(
                f"method {method!r} from {_where(info)} failed in {stage}(): {type(e).__name__}: {first[:200]}; this is a "
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
                # the method × family matrix, one row of it: yes / settings / no per registered family
                "families": {t: cls.capabilities.support(a) for t, a in sorted(self.architectures.items())
                             if t != "compress"},
            })
        return rows


# ---------------------------------------------------------------------- the contract, checked at registration
def _is_name(x: Any) -> bool:
    return isinstance(x, str) and _NAME.fullmatch(x) is not None


def _str_seq(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and all(isinstance(s, str) and s for s in x)


def _pruner_problem(cls: Any, aliases: Any) -> str | None:
    """Why ``cls`` (with ``aliases``) cannot be registered as a method, or None."""
    if not (isinstance(cls, type) and issubclass(cls, Pruner)):
        return f"{cls!r} is not a Pruner subclass with a name"
    label = getattr(cls, "__qualname__", repr(cls))
    name = getattr(cls, "name", None)
    if not name:
        return f"{label} is not a Pruner subclass with a name"
    if not _is_name(name):
        return (f"{label}.name {name!r} is not a method name (a letter, then letters, digits, '_' or '-', "
                "at most 64)")
    if isinstance(aliases, str) or not isinstance(aliases, (tuple, list)):
        return f"aliases of {name!r} must be a tuple of names, not {type(aliases).__name__}"
    bad = [a for a in aliases if not _is_name(a)]
    if bad:
        return f"alias {bad[0]!r} of {name!r} is not a method name"
    if len({name, *aliases}) != 1 + len(aliases):
        return f"the aliases of {name!r} repeat a name"
    from pydantic import BaseModel

    config = cls.Config
    if not (isinstance(config, type) and issubclass(config, BaseModel)):
        return f"{label}.Config is {config!r}, not a pydantic model (subclass compress.PrunerConfig)"
    cap = cls.capabilities
    if not isinstance(cap, Capabilities):
        return f"{label}.capabilities is {cap!r}, not a compress.Capabilities"
    if not (_str_seq(cap.structures) and _str_seq(cap.targets) and cap.export in _EXPORTS
            and all(isinstance(v, bool) for v in (cap.needs_calibration, cap.needs_gradients, cap.sequential))
            and isinstance(cap.summary, str) and isinstance(cap.reference, str)):
        return (f"{label}.capabilities is malformed (structures/targets: tuples of names; needs_*/sequential: "
                f"bool; export: one of {', '.join(_EXPORTS)}; summary/reference: text)")
    try:
        json.dumps(cap.to_dict())
    except Exception as e:  # noqa: BLE001
        return f"{label}.capabilities cannot be listed: {_describe(e)}"
    return None


def _adapter_problem(cls: Any) -> str | None:
    """Why ``cls`` cannot be registered as an architecture adapter, or None."""
    if not (isinstance(cls, type) and issubclass(cls, ArchAdapter)):
        return f"{cls!r} is not an ArchAdapter subclass"
    types = cls.model_types
    if isinstance(types, str) or not _str_seq(types) or not types:
        return f"{cls.__qualname__}.model_types must be a non-empty tuple of model types, not {types!r}"
    return None


# ---------------------------------------------------------------------- provenance
def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _package_locations(package: str) -> tuple[list[Path], bool] | None:
    """Where ``package`` would be imported from, found without running it: ``([file], False)`` for a
    module or a regular package (its ``__init__``), ``(dirs, True)`` for a namespace package; None
    when it cannot be found."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.has_location:
        return [Path(spec.origin).resolve()], False
    dirs = [Path(d).resolve() for d in (spec.submodule_search_locations or [])]
    return (dirs, True) if dirs else None


def _editable_root(dist: Distribution) -> Path | None:
    """The source tree of an editable install (``direct_url.json``, PEP 610), else None."""
    try:
        data = json.loads(dist.read_text("direct_url.json") or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("dir_info"), dict):
        return None
    url = data.get("url")
    if not data["dir_info"].get("editable") or not isinstance(url, str) or not url.startswith("file:"):
        return None
    return Path(unquote(urlparse(url).path)).resolve()


def _provenance_problem(dist: Distribution, key: str, eps: list[EntryPoint]) -> str | None:
    """Why ``dist``, which bears the built-in name ``key``, is not the project's distribution, or None."""
    package = BUILTIN_DISTRIBUTIONS[key]
    for ep in eps:
        if ep.value.split(":")[0].strip().split(".")[0] != package:
            return (f"distribution {key!r} bears a built-in name but its entry point {ep.name} = {ep.value} is "
                    f"outside the project's package {package}")
    found = _package_locations(package)
    if found is None:
        return f"distribution {key!r} bears a built-in name but its package {package} cannot be found"
    where, namespace = found

    def contains(p: Path) -> bool:
        return any(p == w or (namespace and w in p.parents) for w in where)

    root = _editable_root(dist)
    if root is not None:
        if any(w == root or root in w.parents for w in where):
            return None
        return (f"distribution {key!r} bears a built-in name but the {package} that would run ({where[0]}) is "
                f"not in its source tree {root}")
    try:
        files = dist.files
        if files is None and dist.read_text("RECORD") is not None:
            files = []  # an empty RECORD lists nothing (importlib.metadata reads it as no list at all)
    except Exception:  # noqa: BLE001 - unreadable RECORD: nothing to check against
        files = None
    if files is None:
        return None  # no file list at all: taken at its name (documented limit)
    for f in files:
        try:
            if contains(Path(dist.locate_file(f)).resolve()):
                return None
        except (OSError, ValueError):
            continue
    return (f"distribution {key!r} bears a built-in name but the {package} that would run ({where[0]}) is not "
            "one of its files")


def _meta(dist: Distribution) -> tuple[str | None, str | None]:
    try:
        name, version = dist.metadata["Name"], dist.metadata["Version"]
    except Exception:  # noqa: BLE001
        return None, None
    return (str(name) if name else None), (str(version) if version else None)


def _quick_key(dist: Distribution) -> str | None:
    """The normalized name without parsing METADATA where importlib.metadata can (it dedups by the
    same name); METADATA otherwise."""
    quick = getattr(dist, "_normalized_name", None)
    if isinstance(quick, str) and quick:
        return _normalize(quick)
    name, _ = _meta(dist)
    return _normalize(name) if name else None


def _candidate(ep: EntryPoint, name: str | None, version: str | None, builtin: bool = False,
               refused: str | None = None) -> Candidate:
    return Candidate(ep, ep.name, name, version, ep.value, builtin=builtin, refused=refused)


def _classify(ep: EntryPoint) -> Candidate:
    """One entry point on its own (:meth:`Registry.load_entry_point`): built in if its distribution
    passes the provenance check."""
    dist = getattr(ep, "dist", None)
    name, version = _meta(dist) if dist is not None else (None, None)
    key = _normalize(name) if name else None
    if dist is None or key not in BUILTIN_DISTRIBUTIONS:
        return _candidate(ep, name, version)
    problem = _provenance_problem(dist, key, [ep])
    return _candidate(ep, name, version, builtin=problem is None, refused=problem)


def discover() -> list[Candidate]:
    """Every entry point of the ``compress`` group, built-ins first, then by entry-point name.

    A distribution name counts once, the first copy on ``sys.path`` winning (as in
    :func:`importlib.metadata.entry_points`), except for a built-in name: there the first copy that
    passes the provenance check wins and every copy before it is refused (see the module docstring).
    A distribution whose ``entry_points.txt`` has a ``[compress]`` section that cannot be parsed is
    refused rather than breaking discovery."""
    found: list[Candidate] = []
    taken: set[str] = set()
    for dist in importlib.metadata.distributions():
        try:
            eps = [ep for ep in dist.entry_points if ep.group == GROUP]
        except Exception as e:  # noqa: BLE001 - a malformed entry_points.txt
            try:
                text = dist.read_text("entry_points.txt") or ""
            except Exception:  # noqa: BLE001
                text = ""
            name, version = _meta(dist)
            key = _normalize(name) if name else None
            if any(line.strip() == f"[{GROUP}]" for line in text.splitlines()) and key not in taken:
                found.append(Candidate(None, name or "?", name, version, "?",
                                       refused=f"its entry_points.txt cannot be read: {_describe(e)}"))
                if key is not None:
                    taken.add(key)
            continue
        if not eps:
            key = _quick_key(dist)
            if key is not None and key not in BUILTIN_DISTRIBUTIONS:
                taken.add(key)  # as in importlib.metadata, this copy hides later ones of its name
            continue  # a built-in name without entry points (the core) does not settle which copy is ours
        name, version = _meta(dist)
        key = _normalize(name) if name else None
        if key is not None and key in taken:
            continue
        if key in BUILTIN_DISTRIBUTIONS:
            problem = _provenance_problem(dist, key, eps)
            if problem is None:
                taken.add(key)
            found.extend(_candidate(ep, name, version, builtin=problem is None, refused=problem) for ep in eps)
            continue
        if key is not None:
            taken.add(key)
        found.extend(_candidate(ep, name, version) for ep in eps)
    return sorted(found, key=lambda c: (not c.builtin, c.name))


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
