"""The installed product, not the checkout: build the three wheels, install them (not editable) into a
fresh virtualenv, and use them from a folder far from the repository with ``COMPRESS_ASSETS`` unset.

The fresh venv gets the pinned third-party stack (torch, transformers, ...) by linking the packages of
the test's own environment — every one except compress and its plugins — so the test runs offline in
about a minute; ``tox -e wheel`` does the same with a full ``pip install -c constraints.txt`` from the
package index instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("compress", "compress_transact", "compress_baselines", "compress_wanda_sp")
pytestmark = pytest.mark.slow


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def _stack_without_compress(dest: Path) -> None:
    """Symlink every package of this environment's site-packages into ``dest`` except ours (and the
    editable-install hooks that would import the checkout)."""
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower().replace("-", "_")
        if name.startswith(OURS) or name.startswith("__editable__") or name.endswith(".pth"):
            continue
        (dest / entry.name).symlink_to(entry)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    dist = work / "dist"
    src = work / "src"  # build from a copy: setuptools writes build/ and *.egg-info into the project
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", ".tox", "build", "dist", "*.egg-info",
                                                             "__pycache__", "runs", "out", "results"))
    for project in (src, src / "plugins" / "transact", src / "baselines"):
        r = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                  str(project)], cwd=work)
        assert r.returncode == 0, r.stderr[-3000:]
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 3, wheels
    venv = work / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    _stack_without_compress(work / "stack")
    (site / "zz_pinned_stack.pth").write_text(str(work / "stack") + "\n")
    r = _run([str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "-c", str(ROOT / "constraints.txt"),
              *map(str, wheels)])
    assert r.returncode == 0, r.stderr[-3000:]
    # every requirement of the three distributions is met by the pinned stack (pip check would also
    # list packages outside ours, e.g. the GGUF wheel installed with --no-deps)
    r = _run([str(py), "-c", _CHECK_REQUIREMENTS])
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-3000:] + r.stderr[-3000:]
    return venv


_CHECK_REQUIREMENTS = """
from importlib.metadata import distribution, version, PackageNotFoundError
from packaging.requirements import Requirement
bad = []
for dist in ("compress", "compress-transact", "compress-baselines"):
    for req in map(Requirement, distribution(dist).requires or []):
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            bad.append(f"{dist}: {req} missing")
            continue
        if not req.specifier.contains(have, prereleases=True):
            bad.append(f"{dist}: {req} but {have}")
print("\\n".join(bad) or "ok")
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COMPRESS_ASSETS", "PYTHONPATH", "COMPRESS_MODEL")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, **extra)
    return env


def test_installed_wheels_work_away_from_the_checkout(installed, tmp_path, assets):
    compress = str(installed / "bin" / "compress")
    away = tmp_path / "elsewhere"
    away.mkdir()
    r = _run([str(installed / "bin" / "python"), "-c", "import compress, compress.evaluate.harness as h; "
              "print(compress.__file__); print(h.tasks_dir())"], cwd=away, env=_env())
    assert r.returncode == 0 and str(ROOT) not in r.stdout, r.stdout + r.stderr  # the installed copy, not ours
    rows = json.loads(_run([compress, "methods", "--json"], cwd=away, env=_env()).stdout)
    assert {row["distribution"] for row in rows} >= {"compress-transact", "compress-baselines"}

    # prune with the default calibration text (wikitext2) and the quality check, COMPRESS_ASSETS unset:
    # both come from the package
    out = away / "pruned"
    r = _run([compress, "run", "--model", str(assets / "models" / "stories260k"), "--method", "transact",
              "--target", "60%", "--set", "calib_samples=4", "--set", "calib_seq_len=64", "--out", str(out),
              "--json"], cwd=away, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(r.stdout)
    assert rec["calibration"]["path"] == "package:compress/data/wikitext-2-raw/wiki.valid.raw"
    assert rec["quality"]["pruned"]["ppl"] > 0 and (out / "model.safetensors").is_file()

    # lm-eval tasks: their definitions ship in the package; their data needs COMPRESS_ASSETS or the hub
    r = _run([compress, "eval", str(out), "--tasks", "piqa", "--limit", "4"], cwd=away, env=_env())
    assert r.returncode == 2 and "COMPRESS_ASSETS" in r.stderr and "hub:" in r.stderr, r.stderr[-2000:]
    r = _run([compress, "eval", str(out), "--tasks", "piqa", "--limit", "4"], cwd=away,
             env=_env(COMPRESS_ASSETS=str(assets)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 0.0 <= json.loads(r.stdout)["tasks"]["piqa"]["acc"] <= 1.0
