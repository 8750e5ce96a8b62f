"""The registry's catalog (methods, plugins, architectures) cached on disk, so that ``compress
methods`` and ``compress plugins`` answer without importing torch or any plugin.

The cache is keyed by everything the catalog depends on: every installed distribution with a
``compress`` entry-point section — every copy on ``sys.path``, not only the first, since a shadowing
copy changes which one the registry trusts as built in — with its name, version, location and the
digests of its ``entry_points.txt``, ``direct_url.json`` and ``RECORD`` (what the provenance check of
:mod:`compress.plugins` reads); the modification times of the source files of every package the
entry points point into and of compress itself; the plugin-selection environment variables; and the
catalog's format. Any change — a plugin installed, removed, upgraded or edited in place — gives
another key, and the catalog is rebuilt from the real registry (the first call after a change imports
everything, as before). A catalog with a failed plugin (an import error, a refused registration, a
name conflict) is never cached: the failure may be transient, ``COMPRESS_STRICT_PLUGINS`` must see it
raise, and ``compress plugins`` shows it from the registry each time. A cache file that is not a
well-formed catalog (unreadable, truncated, hand-edited, another version's) is ignored and rebuilt,
never trusted. Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from importlib.metadata import Distribution, distributions
from pathlib import Path
from typing import Any

GROUP = "compress"
_ENV = ("COMPRESS_PLUGINS", "COMPRESS_DISABLE_PLUGINS", "COMPRESS_STRICT_PLUGINS")
SCHEMA = 2  # the catalog's format: bumped when a row gains or changes a field


def cache_dir() -> Path:
    """``$COMPRESS_CACHE``, else ``$XDG_CACHE_HOME/compress``, else ``~/.cache/compress``."""
    if os.environ.get("COMPRESS_CACHE"):
        return Path(os.environ["COMPRESS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "compress"


def _tree_mtime(top: str) -> int:
    """Newest modification time (ns) of the ``.py`` files of top-level module ``top``, found
    without importing it (0 when it cannot be found)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return 0
    if spec is None:
        return 0
    roots = list(spec.submodule_search_locations or []) or ([spec.origin] if spec.origin else [])
    newest = 0
    for root in roots:
        p = Path(root)
        files = [p] if p.is_file() else p.rglob("*.py")
        for f in files:
            try:
                newest = max(newest, f.stat().st_mtime_ns)
            except OSError:
                continue
    return newest


def _digest(dist: Distribution, name: str) -> str | None:
    try:
        text = dist.read_text(name)
    except Exception:  # noqa: BLE001 - unreadable metadata is part of the state, not an error here
        return "unreadable"
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:16] if text is not None else None


def _group_distributions() -> tuple[list[Any], set[str]]:
    """One item per installed distribution with a ``[compress]`` section (every copy), and the
    top-level modules its entry points point into."""
    items: list[Any] = []
    tops: set[str] = set()
    for dist in distributions():
        try:
            text = dist.read_text("entry_points.txt") or ""
        except Exception:  # noqa: BLE001
            continue
        if not any(line.strip() == f"[{GROUP}]" for line in text.splitlines()):
            continue
        try:
            name, version = dist.metadata["Name"], dist.metadata["Version"]
            where = str(dist.locate_file(""))
        except Exception:  # noqa: BLE001
            name, version, where = None, None, None
        try:
            for ep in dist.entry_points:
                if ep.group == GROUP:
                    tops.add(ep.value.split(":")[0].strip().split(".")[0])
        except Exception:  # noqa: BLE001 - a malformed section: the registry reports it
            pass
        items.append([str(name), str(version), where, _digest(dist, "entry_points.txt"),
                      _digest(dist, "direct_url.json"), _digest(dist, "RECORD")])
    return sorted(items, key=json.dumps), tops


def fingerprint() -> str:
    """sha256 of what the catalog depends on (see the module docstring)."""
    dists, tops = _group_distributions()
    items: list[Any] = [SCHEMA, dists]
    tops.add("compress")
    items.append(sorted([t, _tree_mtime(t)] for t in tops if t))
    items.append([os.environ.get(k, "") for k in _ENV])
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:32]


def _path(key: str) -> Path:
    return cache_dir() / f"catalog-{key}.json"


def _texts(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def _opt_text(x: Any) -> bool:
    return x is None or isinstance(x, str)


def valid(data: Any) -> bool:
    """Whether ``data`` is a catalog ``compress methods`` / ``compress plugins`` can print: each
    field they read is there with its type."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        return False
    methods, plugins, archs = data.get("methods"), data.get("plugins"), data.get("architectures")
    if not (isinstance(methods, list) and isinstance(plugins, list) and _texts(archs)):
        return False
    for m in methods:
        if not (isinstance(m, dict) and isinstance(m.get("name"), str) and _texts(m.get("aliases"))
                and _opt_text(m.get("distribution")) and _opt_text(m.get("version"))
                and _texts(m.get("structures")) and _texts(m.get("targets"))
                and all(isinstance(m.get(k), bool) for k in ("needs_calibration", "needs_gradients", "sequential"))
                and all(isinstance(m.get(k), str) for k in ("export", "summary", "reference"))):
            return False
    for p in plugins:
        if not (isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("status"), str)
                and _opt_text(p.get("distribution")) and _opt_text(p.get("version"))
                and _opt_text(p.get("error")) and _texts(p.get("methods"))):
            return False
    return True


def read() -> dict[str, Any] | None:
    """The cached catalog for the current installation, or None (also when the file is not a
    well-formed catalog: it is then rebuilt and overwritten)."""
    try:
        data = json.loads(_path(fingerprint()).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if valid(data) else None


def write(catalog: dict[str, Any]) -> None:
    """Cache ``catalog`` (``methods``, ``plugins``, ``architectures``) unless a plugin failed; a
    cache that cannot be written is simply not written."""
    if any(p.get("status") == "failed" for p in catalog.get("plugins", [])):
        return
    catalog = {"schema": SCHEMA, **catalog}
    if not valid(catalog):
        return
    path = _path(fingerprint())
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".catalog-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(catalog, f)
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError):
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def current() -> dict[str, Any]:
    """The catalog: from the cache when it is valid, else from the registry (then cached)."""
    cached = read()
    if cached is not None:
        return cached
    from compress.plugins import get_registry

    reg = get_registry()
    plugins = [p.to_dict() for p in reg.plugins]
    for p in plugins:
        p.pop("traceback", None)
    catalog = {"schema": SCHEMA, "methods": reg.methods_table(), "plugins": plugins,
               "architectures": sorted(reg.architectures)}
    write(catalog)
    return catalog
