"""The registry's catalog (methods, plugins, architectures) cached on disk, so that ``compress
methods`` and ``compress plugins`` answer without importing torch or any plugin.

The cache is keyed by everything the catalog depends on: the ``compress`` entry points (name, value,
distribution and version), the modification times of the source files of every package they point
into and of compress itself, and the plugin-selection environment variables. Any change — a plugin
installed, removed, upgraded or edited in place — gives another key, and the catalog is rebuilt from
the real registry (the first call after a change imports everything, as before). A catalog with a
failed plugin is never cached (the failure may be transient, and ``COMPRESS_STRICT_PLUGINS`` must see
it raise). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

GROUP = "compress"
_ENV = ("COMPRESS_PLUGINS", "COMPRESS_DISABLE_PLUGINS", "COMPRESS_STRICT_PLUGINS")


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


def fingerprint() -> str:
    """sha256 of what the catalog depends on (see the module docstring)."""
    items: list[Any] = []
    tops = {"compress"}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
        dist = getattr(ep, "dist", None)
        items.append([ep.name, ep.value, dist.name if dist else None, dist.version if dist else None])
        tops.add(ep.value.split(":")[0].split(".")[0])
    items.append(sorted([t, _tree_mtime(t)] for t in tops))
    items.append([os.environ.get(k, "") for k in _ENV])
    return hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:32]


def _path(key: str) -> Path:
    return cache_dir() / f"catalog-{key}.json"


def read() -> dict[str, Any] | None:
    """The cached catalog for the current installation, or None."""
    try:
        data = json.loads(_path(fingerprint()).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(k in data for k in ("methods", "plugins", "architectures")):
        return None
    return data


def write(catalog: dict[str, Any]) -> None:
    """Cache ``catalog`` (``methods``, ``plugins``, ``architectures``) unless a plugin failed; a
    cache that cannot be written is simply not written."""
    if any(p.get("status") == "failed" for p in catalog.get("plugins", [])):
        return
    path = _path(fingerprint())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".catalog-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(catalog, f)
        os.replace(tmp, path)
    except OSError:
        return


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
    catalog = {"methods": reg.methods_table(), "plugins": plugins, "architectures": sorted(reg.architectures)}
    write(catalog)
    return catalog
