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


# ------------------------------------------------------------------------ identity and shadowing (issue #24)
_THIEF_SRC = '''
from compress import ArchAdapter, Capabilities, Pruner, hookimpl


class Thief(Pruner):
    name = "{method}"
    capabilities = Capabilities(structures=("mlp_channels",), needs_calibration=False)

    def check(self, model, target):
        raise AssertionError("the impostor's code ran")

    plan_shapes = prune = check


class Innocent(Pruner):
    name = "innocent_{tag}"
    capabilities = Capabilities(structures=("mlp_channels",), needs_calibration=False)


@hookimpl
def register_pruners(register):
    register(Innocent)
    register(Thief)
'''

_ADAPTER_SRC = '''
from compress import ArchAdapter, hookimpl


class Adapter_{tag}(ArchAdapter):
    model_types = {types!r}

    def __init__(self, model):
        {init}


@hookimpl
def register_architectures(register):
    register(Adapter_{tag})
'''


def plugin(site: Path, dist: str, ep: str, src: str, version: str = "1.0") -> str:
    """Install ``dist`` with the one entry point ``ep`` into a module of source ``src``; its module name."""
    mod = f"plugmod_{_uid()}"
    make_dist(site, dist, version, {ep: mod}, {mod: src})
    return mod


def adapter_plugin(site: Path, dist: str, ep: str, types: tuple[str, ...], init: str = "super().__init__(model)") -> str:
    return plugin(site, dist, ep, _ADAPTER_SRC.format(tag=_uid(), types=types, init=init))


def _cli(site: Path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            "COMPRESS_CACHE": str(site.parent / "cache"), "COLUMNS": "400", **env}
    full.pop("COMPRESS_STRICT_PLUGINS", None)
    return subprocess.run([str(COMPRESS_BIN), *argv], env=full, capture_output=True, text=True, timeout=300)


def _registry() -> Registry:
    """A registry that never lets a plugin's BaseException reach pytest (it would end the session)."""
    try:
        return Registry()
    except PluginError:
        raise
    except BaseException as e:  # noqa: BLE001
        pytest.fail(f"a plugin's {type(e).__name__} escaped the registry")


def test_builtins_are_exactly_our_distributions(site):
    tag = _uid()
    plugin(site, f"compress-evil-{tag}", f"evil_{tag}", _PRUNER_SRC.format(cls="E", method=f"evil_{tag}"))
    from compress.plugins import discover

    kinds = {c.distribution: c.builtin for c in discover()}
    assert kinds["compress-transact"] and kinds["compress-baselines"]
    assert kinds[f"compress-evil-{tag}"] is False
    if "compress-wanda-sp" in kinds:  # the example is installed in the dev environment: third-party
        assert kinds["compress-wanda-sp"] is False
    reg = _registry()
    assert _info(reg, "transact").builtin and not _info(reg, f"evil_{tag}").builtin


def test_compress_prefixed_third_party_cannot_take_a_builtin_method(site):
    from compress.target import Target
    from compress.testing import tiny_model

    tag = _uid()
    # "aaa_" sorts before "transact": if the prefix made it first-party it would load first and win
    ep = f"aaa_evil_{tag}"
    plugin(site, f"compress-evil-{tag}", ep, _THIEF_SRC.format(method="transact", tag=tag))
    reg = _registry()
    info = _info(reg, ep)
    assert info.status == "failed" and not info.builtin
    assert "'transact' is already registered by transact (compress-transact, built-in)" in info.error
    assert "cannot replace a built-in method" in info.error
    assert f"innocent_{tag}" not in reg.pruners  # refused as a whole
    assert reg.get("transact").__module__ == "compress_transact.transact"
    assert reg.origin["transact"].distribution == "compress-transact"
    summary = reg.make("transact").plan_shapes(tiny_model("llama-gqa"), Target.parse("50%"))
    assert summary["f"] > 0  # the built-in ran, not the impostor (which raises)


def test_impostor_with_a_builtin_name_is_refused(site):
    tag = _uid()
    # exactly our distribution's name, first on sys.path (it shadows ours for importlib.metadata)
    mod = plugin(site, "compress-transact", "transact", _THIEF_SRC.format(method="transact", tag=tag),
                 version="9.9.9")
    reg = _registry()
    fake = [p for p in reg.plugins if p.version == "9.9.9"]
    assert len(fake) == 1 and fake[0].status == "failed" and not fake[0].builtin
    assert "outside the project's package compress_transact" in fake[0].error
    real = [p for p in reg.plugins if p.distribution == "compress-transact" and p.version != "9.9.9"]
    assert len(real) == 1 and real[0].status == "loaded" and real[0].builtin
    assert reg.get("transact").__module__ == "compress_transact.transact"
    assert mod not in sys.modules  # never imported


def test_shadowing_copy_without_the_package_files_is_refused(site):
    # our name and our module, but the code that would run is not one of its files
    make_dist(site, "compress-baselines", "9.9.8", {"naive": "compress_baselines.naive"}, {})
    reg = _registry()
    fake = [p for p in reg.plugins if p.version == "9.9.8"]
    assert len(fake) == 1 and fake[0].status == "failed" and "is not one of its files" in fake[0].error
    assert reg.origin["magnitude"].builtin and reg.origin["magnitude"].version != "9.9.8"


def test_third_party_adapter_cannot_replace_builtin_llama(site):
    tag = _uid()
    dist, ep = f"llama-thief-{tag}", f"llama_thief_{tag}"
    adapter_plugin(site, dist, ep, ("llama", f"fam_{tag}"), init="raise RuntimeError('broken adapter')")
    reg = _registry()
    info = _info(reg, ep)
    assert info.status == "failed"
    assert "architecture 'llama' is already handled by compress-core (compress, built-in)" in info.error
    assert reg.architectures["llama"].__name__ == "ArchAdapter" and f"fam_{tag}" not in reg.architectures
    assert reg.arch_origin["llama"].name == "compress-core" and info.architectures == []


def test_two_third_party_adapters_first_wins(site):
    tag = _uid()
    adapter_plugin(site, f"fam-a-{tag}", f"a_fam_{tag}", (f"fam_{tag}",))
    adapter_plugin(site, f"fam-b-{tag}", f"b_fam_{tag}", (f"fam_{tag}", f"other_{tag}"))
    reg = _registry()
    first, second = _info(reg, f"a_fam_{tag}"), _info(reg, f"b_fam_{tag}")
    assert first.status == "loaded" and first.architectures == [f"fam_{tag}"]
    assert second.status == "failed"
    assert f"architecture 'fam_{tag}' is already handled by a_fam_{tag} (fam-a-{tag})" in second.error
    assert reg.arch_origin[f"fam_{tag}"] is first and f"other_{tag}" not in reg.architectures


def test_adapter_error_names_its_plugin(site, monkeypatch):
    from types import SimpleNamespace

    tag = _uid()
    dist, ep = f"fragile-{tag}", f"fragile_{tag}"
    adapter_plugin(site, dist, ep, (f"fragile_{tag}",), init="raise RuntimeError('adapter boom')")
    reg = _registry()
    model = SimpleNamespace(config=SimpleNamespace(model_type=f"fragile_{tag}"))
    with pytest.raises(PluginError, match=f"from plugin '{ep}' \\({dist} 1.0\\) failed: RuntimeError: adapter boom") as ei:
        reg.adapter_for(model)
    assert f"COMPRESS_DISABLE_PLUGINS={ep}" in str(ei.value) and "\n" not in str(ei.value)
    monkeypatch.setenv("COMPRESS_STRICT_PLUGINS", "1")
    with pytest.raises(RuntimeError, match="adapter boom"):
        reg.adapter_for(model)


_EXITS = {"SystemExit": "raise SystemExit(3)", "KeyboardInterrupt": "raise KeyboardInterrupt",
          "GeneratorExit": "raise GeneratorExit('bye')"}


@pytest.mark.parametrize("where", ["import", "hook"])
@pytest.mark.parametrize("exc", sorted(_EXITS))
def test_base_exception_from_a_plugin_is_a_failure(site, exc, where):
    tag = _uid()
    raise_ = _EXITS[exc]
    src = (f"{raise_}\n" if where == "import" else
           f"from compress import hookimpl\n\n@hookimpl\ndef register_pruners(register):\n    {raise_}\n")
    ep = f"quitter_{tag}"
    plugin(site, f"quitter-{tag}", ep, src)
    _, gep, method = good_plugin(site, tag)
    reg = _registry()
    info = _info(reg, ep)
    assert info.status == "failed"
    assert info.error.startswith("import failed: " if where == "import" else "registration failed: ")
    assert exc in info.error
    assert _info(reg, gep).status == "loaded" and {method, "magnitude", "transact"} <= set(reg.pruners)


def test_strict_mode_reraises_base_exception_as_plugin_error(site, monkeypatch):
    tag = _uid()
    ep = f"quitter_{tag}"
    plugin(site, f"quitter-{tag}", ep, "raise SystemExit(3)\n")
    monkeypatch.setenv("COMPRESS_PLUGINS", ep)
    monkeypatch.setenv("COMPRESS_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=f"plugin '{ep}' \\(quitter-{tag}\\): import failed: SystemExit: 3") as ei:
        _registry()
    assert isinstance(ei.value.__cause__, SystemExit)


@pytest.mark.parametrize("what", ["llama adapter", "builtin method", "capabilities=None"])
def test_strict_mode_raises_on_refusal(site, monkeypatch, what):
    tag = _uid()
    ep = f"refused_{tag}"
    if what == "llama adapter":
        adapter_plugin(site, f"refused-{tag}", ep, ("llama",))
    elif what == "builtin method":
        plugin(site, f"compress-evil-{tag}", ep, _THIEF_SRC.format(method="transact", tag=tag))
    else:
        plugin(site, f"refused-{tag}", ep, _PRUNER_SRC.format(cls="P", method=f"p_{tag}").replace(
            "capabilities = Capabilities(", "capabilities = None and Capabilities(") + _REGISTER.format(cls="P"))
    monkeypatch.setenv("COMPRESS_STRICT_PLUGINS", "1")
    monkeypatch.setenv("COMPRESS_DISABLE_PLUGINS", "wanda_sp")  # only ours and this one
    with pytest.raises(PluginError, match=f"plugin '{ep}' .*registration refused"):
        _registry()


_REGISTER = '''
@hookimpl
def register_pruners(register):
    register({cls})
'''

_BAD_CONTRACT = {
    "capabilities=None": ("capabilities = Capabilities(", "capabilities = None and Capabilities(",
                          "capabilities is None, not a compress.Capabilities"),
    "capabilities of another type": ("capabilities = Capabilities(", "capabilities = dict(",
                                     "not a compress.Capabilities"),
    "malformed capabilities": ('structures=("mlp_channels",)', 'structures="mlp_channels"',
                               "capabilities is malformed"),
    "Config not pydantic": ("    capabilities =", "    Config = dict\n    capabilities =", "not a pydantic model"),
    "Config None": ("    capabilities =", "    Config = None\n    capabilities =", "not a pydantic model"),
    "name not a string": ('name = "{method}"', "name = 42", "is not a method name"),
    "name with spaces": ('name = "{method}"', 'name = "bad name; rm -rf"', "is not a method name"),
}


@pytest.mark.parametrize("case", sorted(_BAD_CONTRACT))
def test_pruner_breaking_the_contract_is_refused(site, case):
    old, new, message = _BAD_CONTRACT[case]
    tag = _uid()
    ep, method = f"bad_{tag}", f"bad_{tag}"
    src = _PRUNER_SRC.replace(old, new).format(cls="Bad", method=method) + _REGISTER.format(cls="Bad")
    plugin(site, f"bad-{tag}", ep, src)
    reg = _registry()
    info = _info(reg, ep)
    assert info.status == "failed" and info.error.startswith("registration refused: ") and message in info.error
    assert method not in reg.pruners and info.methods == []
    rows = {r["name"] for r in reg.methods_table()}  # what `compress methods` prints: still works
    assert {"magnitude", "transact"} <= rows


def test_string_aliases_are_refused(site):
    tag = _uid()
    ep = f"strali_{tag}"
    plugin(site, f"strali-{tag}", ep, _PRUNER_SRC.format(cls="P", method=f"p_{tag}") + '''
@hookimpl
def register_pruners(register):
    register(P, aliases="pq")
''')
    reg = _registry()
    assert "must be a tuple of names" in _info(reg, ep).error and "p" not in reg.aliases


def test_swallowed_refusal_still_fails_the_plugin(site):
    tag = _uid()
    ep = f"swallow_{tag}"
    plugin(site, f"swallow-{tag}", ep, _THIEF_SRC.format(method="magnitude", tag=tag).replace(
        "    register(Thief)", "    try:\n        register(Thief)\n    except Exception:\n        pass"))
    reg = _registry()
    assert _info(reg, ep).status == "failed" and "'magnitude' is already registered" in _info(reg, ep).error
    assert f"innocent_{tag}" not in reg.pruners


def test_malformed_entry_points_file_is_refused_not_fatal(site):
    tag = _uid()
    info = site / f"mangled_{tag}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mangled-{tag}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[compress]\nthis line has no equals sign\n")
    reg = _registry()
    (bad,) = [p for p in reg.plugins if p.distribution == f"mangled-{tag}"]
    assert bad.status == "failed" and "entry_points.txt cannot be read" in bad.error
    assert "magnitude" in reg.pruners


def test_cli_keeps_working_with_hostile_plugins(site):
    """SystemExit / KeyboardInterrupt at import, capabilities=None, a llama adapter: `compress methods`
    lists everything else (exit 0), `compress plugins` shows each one failed and why."""
    tag = _uid()
    hostile = {
        f"exit_{tag}": ("raise SystemExit(0)\n", "import failed: SystemExit: 0"),
        f"ctrlc_{tag}": ("raise KeyboardInterrupt\n", "import failed: KeyboardInterrupt"),
        f"nocap_{tag}": (_PRUNER_SRC.replace("capabilities = Capabilities(", "capabilities = None and Capabilities(")
                         .format(cls="N", method=f"nocap_{tag}") + _REGISTER.format(cls="N"),
                         "capabilities is None"),
        f"llama_{tag}": (_ADAPTER_SRC.format(tag=tag, types=("llama",), init="super().__init__(model)"),
                         "architecture 'llama' is already handled by compress-core (compress, built-in)"),
    }
    for ep, (src, _) in hostile.items():
        plugin(site, f"hostile-{ep.replace('_', '-')}", ep, src)
    _, _, method = good_plugin(site, tag)
    r = _cli(site, "methods")
    assert r.returncode == 0, r.stderr
    assert all(m in r.stdout for m in ("magnitude", "transact", method)) and f"nocap_{tag}" not in r.stdout
    r = _cli(site, "methods", "--json")
    assert r.returncode == 0, r.stderr
    assert {"magnitude", "transact", method} <= {x["name"] for x in json.loads(r.stdout)}
    r = _cli(site, "plugins", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    plugins = {p["name"]: p for p in out["plugins"]}
    for ep, (_, error) in hostile.items():
        assert plugins[ep]["status"] == "failed" and error in plugins[ep]["error"], plugins[ep]
    assert plugins["transact"]["builtin"] is True and plugins[f"llama_{tag}"]["builtin"] is False
    assert "llama" in out["architectures"]
    r = _cli(site, "plugins")
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") > 2}
    assert "failed" in rows[f"llama_{tag}"] and "already handled by compress-core" in rows[f"llama_{tag}"]
    assert "failed" in rows[f"exit_{tag}"] and "SystemExit" in rows[f"exit_{tag}"]


# ------------------------------------------------------------------------------------- the catalog cache
@pytest.fixture
def fresh_catalog(tmp_path, monkeypatch):
    """``compress.catalog`` over an empty cache and a registry built anew (restored afterwards)."""
    import compress.catalog as catalog
    import compress.plugins as plugins

    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(plugins, "_REGISTRY", None)
    monkeypatch.setattr(catalog, "fingerprint", lambda: "test")  # other edits to the tree change the real key
    return catalog


def test_catalog_shows_refused_plugins_and_is_not_cached(site, fresh_catalog):
    tag = _uid()
    ep = f"llama_{tag}"
    adapter_plugin(site, f"llama-{tag}", ep, ("llama",))
    cat = fresh_catalog.current()
    (row,) = [p for p in cat["plugins"] if p["name"] == ep]
    assert row["status"] == "failed" and "already handled by compress-core" in row["error"]
    assert "traceback" not in row and fresh_catalog.read() is None  # never served from a cache


@pytest.mark.parametrize("poison", [
    "garbage{", "", "[" * 100_000, json.dumps([1, 2]),
    json.dumps({"methods": [{"name": 1}], "plugins": [], "architectures": []}),
    json.dumps({"schema": 2, "methods": [{"name": "x", "capabilities": None}], "plugins": [], "architectures": []}),
    json.dumps({"schema": 2, "methods": [], "plugins": [{"name": "x", "status": "loaded", "methods": None}],
                "architectures": ["llama"]}),
])
def test_poisoned_catalog_cache_is_rebuilt(fresh_catalog, capsys, poison):
    from compress.cli import main

    first = fresh_catalog.current()
    path = fresh_catalog._path("test")
    assert json.loads(path.read_text())["methods"] == first["methods"]  # cached
    path.write_text(poison)
    assert main(["methods", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == first["methods"]
    assert main(["plugins"]) == 0 and "transact" in capsys.readouterr().out
    assert fresh_catalog.valid(json.loads(path.read_text()))  # overwritten with a good one
