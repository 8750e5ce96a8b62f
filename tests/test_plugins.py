"""Plugin discovery through REAL installed distributions (``*.dist-info`` + entry points on sys.path)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from compress.errors import PluginError, UsageError
from compress.plugins import Registry

COMPRESS_BIN = Path(sys.executable).with_name("compress")

_PRUNER_SRC = '''
from compress import Capabilities, Pruner, PruneResult, hookimpl


class {cls}(Pruner):
    name = "{method}"
    capabilities = Capabilities(structures=("mlp_channels",), needs_calibration=False, targets=("params",),
                                summary="toy method from a test distribution")

    def prune(self, model, target, ctx):
        return PruneResult(model=model, plan={{}})
'''


def make_dist(root: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Install a distribution the way pip leaves it: ``<dist>-<ver>.dist-info`` + top-level modules."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[compress]\n{eps}")
    (info / "RECORD").write_text("")
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))


def _uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh site dir on sys.path; plugin env vars cleared."""
    for var in ("COMPRESS_PLUGINS", "COMPRESS_DISABLE_PLUGINS", "COMPRESS_STRICT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def good_plugin(site: Path, tag: str) -> tuple[str, str, str]:
    """A distribution ``toy-<tag>`` 1.2.3 whose entry point ``toy_<tag>`` registers method ``toy_<tag>``."""
    dist, ep, mod, method = f"toy-{tag}", f"toy_{tag}", f"toy_plugin_{tag}", f"toy_{tag}"
    src = _PRUNER_SRC.format(cls="ToyPruner", method=method) + f'''
@hookimpl
def register_pruners(register):
    register(ToyPruner, aliases=("toyalias_{tag}",))
'''
    make_dist(site, dist, "1.2.3", {ep: mod}, {mod: src})
    return dist, ep, method


def broken_import_plugin(site: Path, tag: str) -> tuple[str, str]:
    dist, ep, mod = f"broken-{tag}", f"broken_{tag}", f"broken_plugin_{tag}"
    make_dist(site, dist, "0.0.1", {ep: mod}, {mod: "raise RuntimeError('kaboom at import')\n"})
    return dist, ep


def _info(reg: Registry, ep: str):
    (info,) = [p for p in reg.plugins if p.name == ep]
    return info


# ------------------------------------------------------------------------------------- discovery
def test_discovery_of_installed_distribution(site):
    before = Registry()
    dist, ep, method = good_plugin(site, _uid())
    # entry_points() must not be cached across calls: a distribution installed later is seen.
    assert method not in before.pruners
    assert any(e.name == ep for e in importlib.metadata.entry_points(group="compress"))
    reg = Registry()
    assert method in reg.pruners
    rows = {r["name"]: r for r in reg.methods_table()}
    row = rows[method]
    assert row["distribution"] == dist and row["version"] == "1.2.3"
    assert row["aliases"] == [f"toyalias_{ep[4:]}"]
    assert row["structures"] == ["mlp_channels"] and row["needs_calibration"] is False
    info = _info(reg, ep)
    assert (info.status, info.distribution, info.version, info.methods) == ("loaded", dist, "1.2.3", [method])
    assert reg.get(method) is reg.get(f"toyalias_{ep[4:]}")
    # the built-in methods are still there
    assert {"random", "magnitude", "transact"} <= set(reg.pruners)


def test_broken_import_is_recorded_and_others_load(site):
    tag = _uid()
    bdist, bep = broken_import_plugin(site, tag)
    _, gep, method = good_plugin(site, tag)
    reg = Registry()
    info = _info(reg, bep)
    assert info.status == "failed"
    assert (info.distribution, info.version) == (bdist, "0.0.1")
    assert "kaboom at import" in info.error and "RuntimeError" in info.error
    assert info.methods == []
    assert _info(reg, gep).status == "loaded"
    assert method in reg.pruners and "magnitude" in reg.pruners
    # an unknown method names the failed plugin so the user knows where to look
    with pytest.raises(UsageError, match=f"plugins that failed to load: .*{bep}"):
        reg.get("no_such_method")


def test_cli_lists_plugins_and_survives_broken_one(site):
    tag = _uid()
    dist, ep, method = good_plugin(site, tag)
    bdist, bep = broken_import_plugin(site, tag)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    env.pop("COMPRESS_STRICT_PLUGINS", None)
    r = subprocess.run([str(COMPRESS_BIN), "methods", "--json"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert rows[method]["distribution"] == dist and rows[method]["version"] == "1.2.3"
    assert "magnitude" in rows
    r = subprocess.run([str(COMPRESS_BIN), "plugins", "--json"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    plugins = {p["name"]: p for p in json.loads(r.stdout)["plugins"]}
    assert plugins[ep]["status"] == "loaded" and plugins[ep]["methods"] == [method]
    assert plugins[bep]["status"] == "failed"
    assert plugins[bep]["distribution"] == bdist and plugins[bep]["version"] == "0.0.1"
    assert "kaboom at import" in plugins[bep]["error"]


def test_hook_raising_is_failed_not_partially_registered(site):
    tag = _uid()
    dist, ep, mod = f"halfway-{tag}", f"halfway_{tag}", f"halfway_plugin_{tag}"
    src = _PRUNER_SRC.format(cls="HalfPruner", method=f"half_{tag}") + """
@hookimpl
def register_pruners(register):
    register(HalfPruner)
    raise ValueError("second registration went wrong")
"""
    make_dist(site, dist, "2.0", {ep: mod}, {mod: src})
    # a later hook raising must undo what the earlier hooks of the same plugin registered
    dist2, ep2, mod2 = f"late-{tag}", f"late_{tag}", f"late_plugin_{tag}"
    src2 = _PRUNER_SRC.format(cls="LatePruner", method=f"late_{tag}") + f"""
from compress import ArchAdapter

class LateAdapter(ArchAdapter):
    model_types = ("late_family_{tag}",)

@hookimpl
def register_pruners(register):
    register(LatePruner)

@hookimpl
def register_architectures(register):
    register(LateAdapter)
    raise KeyError("architectures exploded")
"""
    make_dist(site, dist2, "3.1", {ep2: mod2}, {mod2: src2})
    reg = Registry()
    info = _info(reg, ep)
    assert info.status == "failed" and info.distribution == dist and info.version == "2.0"
    assert info.error == "registration failed: ValueError: second registration went wrong"
    assert f"half_{tag}" not in reg.pruners and f"half_{tag}" not in reg.origin
    info2 = _info(reg, ep2)
    assert info2.status == "failed" and "architectures exploded" in info2.error and info2.methods == []
    assert f"late_{tag}" not in reg.pruners and f"late_family_{tag}" not in reg.architectures
    registered = [name for name, _ in reg.pm.list_name_plugin()]
    assert not any(n.startswith((f"{ep}:", f"{ep2}:")) for n in registered)  # unregistered from pluggy
    assert "magnitude" in reg.pruners


def test_name_conflict_is_failed_and_names_owner(site):
    tag = _uid()
    # "aaa_" sorts before "naive": first-party distributions must still load first and keep their names
    dist, ep, mod = f"thief-{tag}", f"aaa_thief_{tag}", f"thief_plugin_{tag}"
    src = _PRUNER_SRC.format(cls="Thief", method="magnitude") + '''
@hookimpl
def register_pruners(register):
    register(Thief)
'''
    make_dist(site, dist, "1.0", {ep: mod}, {mod: src})
    reg = Registry()
    info = _info(reg, ep)
    assert info.status == "failed"
    assert "'magnitude' is already registered by naive" in info.error
    owner = reg.origin["magnitude"]
    assert owner.name == "naive" and owner.distribution == "compress-baselines"
    assert _info(reg, "naive").status == "loaded"
    assert reg.pruners["magnitude"].__module__ == "compress_baselines.naive"


def test_alias_conflict_is_failed(site):
    tag = _uid()
    dist, ep, mod = f"alias-{tag}", f"alias_{tag}", f"alias_plugin_{tag}"
    src = _PRUNER_SRC.format(cls="P", method=f"fresh_{tag}") + '''
@hookimpl
def register_pruners(register):
    register(P, aliases=("l2",))
'''
    make_dist(site, dist, "1.0", {ep: mod}, {mod: src})
    reg = Registry()
    assert _info(reg, ep).status == "failed"
    assert "'l2' is already registered by naive" in _info(reg, ep).error
    assert f"fresh_{tag}" not in reg.pruners  # all-or-nothing
    assert reg.get("l2") is reg.get("magnitude")


def test_only_and_disable_env(site, monkeypatch):
    tag = _uid()
    dist, ep, method = good_plugin(site, tag)
    monkeypatch.setenv("COMPRESS_PLUGINS", ep)
    reg = Registry()
    assert set(reg.pruners) == {method}
    assert _info(reg, "naive").status == "blocked" and _info(reg, "transact").status == "blocked"
    # by distribution name as well
    monkeypatch.setenv("COMPRESS_PLUGINS", f"compress-baselines, {dist}")
    reg = Registry()
    assert {"random", "magnitude", method} <= set(reg.pruners) and "transact" not in reg.pruners
    monkeypatch.delenv("COMPRESS_PLUGINS")
    monkeypatch.setenv("COMPRESS_DISABLE_PLUGINS", f"{ep},transact")
    reg = Registry()
    assert _info(reg, ep).status == "blocked" and method not in reg.pruners
    assert "transact" not in reg.pruners and "magnitude" in reg.pruners
    with pytest.raises(UsageError, match="unknown method"):
        reg.get("transact")


def test_blocked_broken_plugin_is_never_imported(site, monkeypatch):
    tag = _uid()
    bdist, bep = broken_import_plugin(site, tag)
    monkeypatch.setenv("COMPRESS_DISABLE_PLUGINS", bdist)
    reg = Registry()
    assert _info(reg, bep).status == "blocked" and _info(reg, bep).error is None
    assert f"broken_plugin_{tag}" not in sys.modules


def test_strict_mode_raises(site, monkeypatch):
    tag = _uid()
    bdist, bep = broken_import_plugin(site, tag)
    monkeypatch.setenv("COMPRESS_PLUGINS", bep)  # keep whatever else is installed out of the way
    monkeypatch.setenv("COMPRESS_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=f"plugin '{bep}' \\({bdist}\\): import failed") as ei:
        Registry()
    assert isinstance(ei.value.__cause__, RuntimeError)
    monkeypatch.setenv("COMPRESS_STRICT_PLUGINS", "0")
    assert _info(Registry(), bep).status == "failed"


def test_strict_mode_raises_on_conflict(site, monkeypatch):
    tag = _uid()
    dist, ep, mod = f"dup-{tag}", f"dup_{tag}", f"dup_plugin_{tag}"
    make_dist(site, dist, "1.0", {ep: mod}, {mod: _PRUNER_SRC.format(cls="D", method="random") + '''
@hookimpl
def register_pruners(register):
    register(D)
'''})
    monkeypatch.setenv("COMPRESS_PLUGINS", f"naive,{ep}")
    monkeypatch.setenv("COMPRESS_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="already registered"):
        Registry()


def test_unknown_method_did_you_mean():
    reg = Registry()
    with pytest.raises(UsageError, match="did you mean 'magnitude'") as ei:
        reg.get("magnitud")
    assert "known methods:" in str(ei.value) and "random" in str(ei.value)
    with pytest.raises(UsageError, match="unknown method 'zzzz'; known methods"):
        reg.get("zzzz")


def test_non_pruner_registration_fails(site):
    tag = _uid()
    dist, ep, mod = f"notapruner-{tag}", f"notapruner_{tag}", f"notapruner_plugin_{tag}"
    make_dist(site, dist, "1.0", {ep: mod}, {mod: '''
from compress import hookimpl

class NotAPruner:
    name = "nope"

@hookimpl
def register_pruners(register):
    register(NotAPruner)
'''})
    reg = Registry()
    assert _info(reg, ep).status == "failed" and "not a Pruner subclass" in _info(reg, ep).error
    assert "nope" not in reg.pruners


def test_architecture_plugin(site):
    tag = _uid()
    dist, ep, mod = f"arch-{tag}", f"arch_{tag}", f"arch_plugin_{tag}"
    make_dist(site, dist, "1.0", {ep: mod}, {mod: f'''
from compress import ArchAdapter, hookimpl

class MyAdapter(ArchAdapter):
    model_types = ("myfamily_{tag}",)

@hookimpl
def register_architectures(register):
    register(MyAdapter)
'''})
    reg = Registry()
    assert _info(reg, ep).status == "loaded"
    assert reg.architectures[f"myfamily_{tag}"].__name__ == "MyAdapter"
    assert reg.architectures["llama"].__name__ == "ArchAdapter"  # built-in kept
