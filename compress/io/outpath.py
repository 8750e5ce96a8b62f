"""The one guard for every path compress writes: outputs never overlap inputs, and ``--overwrite``
only ever replaces what compress itself wrote.

Every command that writes (``run``, ``recover``, ``export --gguf``, ``bench``, ``report``) checks its
output here before any work, so a refusal costs nothing and changes nothing:

* :func:`check_apart` — the output is not an input, not inside one and does not contain one
  (``--out`` equal to the model folder, its parent, a folder inside it, the folder of the ``--calib``
  file...). Paths are compared resolved (``~``, ``..`` and symlinks followed), so a symlink to the
  model folder is the model folder.
* :func:`check_output_dir` — an output *folder*: absent, or (with ``--overwrite``) a folder compress
  wrote, recognised by the run record or plan file :func:`compress.io.export.export_model` writes
  into every folder (:data:`RECORD_FILE`, :data:`PLAN_FILE`), or an empty folder. Anything else is
  refused with or without ``--overwrite``: replacing it would delete files compress knows nothing of.
* :func:`check_output_file` — an output *file* (``export --gguf --out``): absent, or (with
  ``--overwrite``) a file of the kind compress writes there (a GGUF file: its magic bytes).
* ``compress bench`` (:func:`compress.bench.runner.run_suite`) keeps its results folder apart from
  the suite's models and the ``--verify`` records, and never appends to or removes a ``records.jsonl``
  that holds no benchmark record; ``compress report`` only adds its own files and refuses one that
  would replace a records file it reads (:func:`check_files_apart`).

Each refusal is a one-line :class:`~compress.errors.UsageError` (exit 2) that says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from compress.errors import UsageError

#: What :func:`compress.io.export.export_model` writes into every folder (the plan, the run record);
#: their presence is how an output folder is known to be compress's own.
PLAN_FILE = "compress_plan.json"
RECORD_FILE = "compress_run.json"

#: An input of a command: (what the user calls it, e.g. "the model folder" or "--calib", its path).
Input = tuple[str, str | os.PathLike[str] | None]


def resolved(path: str | os.PathLike[str]) -> Path:
    """``path`` absolute, with ``~``, ``..`` and every symlink along it followed."""
    return Path(os.path.realpath(Path(path).expanduser()))


def local_path(spec: str | os.PathLike[str] | None) -> Path | None:
    """The local file or folder an input names, resolved; None for a hub id, a dataset alias or nothing.

    ``--calib data.jsonl:text`` names ``data.jsonl``; a name that exists as given wins over that reading."""
    if spec is None or str(spec) == "":
        return None
    p = Path(spec).expanduser()
    if p.exists():
        return resolved(p)
    text = str(spec)
    if ":" in text:
        head = Path(text.rsplit(":", 1)[0]).expanduser()
        if head.exists():
            return resolved(head)
    return None


def _within(inner: Path, outer: Path) -> bool:
    return inner != outer and outer in inner.parents


def check_apart(out: str | os.PathLike[str], inputs: Iterable[Input], *, option: str = "--out",
                allow_inside: bool = False) -> Path:
    """Refuse an output that is one of ``inputs``, lies inside one, or contains one; returns ``out``
    resolved. ``allow_inside``: an output inside an input folder is fine (``compress report`` writes
    its ``report/`` next to the records it reads, and never deletes)."""
    target = resolved(out)
    given = Path(out).expanduser()
    shown = str(target) if given == target else f"{out} (= {target})"  # a symlink or relative path: both
    for label, raw in inputs:
        src = local_path(raw)
        if src is None:
            continue
        if target == src:
            raise UsageError(f"{option} {shown} is {label} itself: writing there would replace the input; "
                             f"choose another {option}")
        if _within(src, target):
            raise UsageError(f"{option} {shown} contains {label} ({src}): writing there could replace or delete it; "
                             f"choose an {option} outside it")
        if _within(target, src) and not allow_inside:
            raise UsageError(f"{option} {shown} is inside {label} ({src}): it would change the input; "
                             f"choose an {option} outside it")
    return target


def written_by_compress(folder: str | os.PathLike[str]) -> bool:
    """True for a folder holding the run record or plan file that every compress export writes."""
    folder = Path(folder)
    return any((folder / name).is_file() and not (folder / name).is_symlink() for name in (RECORD_FILE, PLAN_FILE))


def _writable_parent(target: Path, option: str) -> None:
    probe = target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot create {target}: {probe} is a file, not a folder; choose another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {target.parent}; choose a writable {option}")


def check_output_dir(out: str | os.PathLike[str], overwrite: bool = False, *, inputs: Iterable[Input] = (),
                     option: str = "--out") -> Path:
    """Refuse an output folder that overlaps ``inputs``, that exists (unless ``overwrite`` and compress
    wrote it, or it is empty) or whose parent is not writable; returns it resolved. Before any work."""
    target = check_apart(out, inputs, option=option)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise UsageError(f"output {target} exists and is not a folder; choose another {option}")
        empty = not any(target.iterdir())
        if not empty and not written_by_compress(target):
            raise UsageError(f"output folder {target} already exists and was not written by compress (no "
                             f"{RECORD_FILE}), so it is never replaced; choose another {option} or remove it yourself")
        if not overwrite:
            raise UsageError(f"output folder {target} already exists; pass --overwrite or choose another {option}")
    _writable_parent(target, option)
    return target


GGUF_MAGIC = b"GGUF"


def check_output_file(out: str | os.PathLike[str], overwrite: bool = False, *, inputs: Iterable[Input] = (),
                      option: str = "--out", magic: bytes = GGUF_MAGIC, kind: str = "GGUF") -> Path:
    """Refuse an output file that overlaps ``inputs``, is a folder, exists (unless ``overwrite`` and it
    is a ``kind`` file, starting with ``magic``) or whose folder is not writable; returns it resolved."""
    target = check_apart(out, inputs, option=option)
    if target.is_dir():
        raise UsageError(f"{option} {target} is a folder; give a file name")
    if target.exists():
        try:
            with open(target, "rb") as f:
                head = f.read(len(magic))
        except OSError as e:
            raise UsageError(f"cannot read {target} ({e.strerror or e}); choose another {option}") from None
        if head != magic:
            raise UsageError(f"{target} already exists and is not a {kind} file, so it is never replaced; choose "
                             f"another {option} or remove it yourself")
        if not overwrite:
            raise UsageError(f"{target} already exists; pass --overwrite or choose another {option}")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {target.parent}; choose a writable {option}")
    return target


def check_files_apart(files: Iterable[str | os.PathLike[str]], inputs: Iterable[Input], *,
                      option: str = "--out") -> None:
    """Refuse when writing any of ``files`` would replace one of ``inputs`` (a report file named like a
    records file it reads)."""
    sources = [(label, p) for label, raw in inputs if (p := local_path(raw)) is not None]
    for f in files:
        target = resolved(f)
        for label, src in sources:
            if target == src:
                raise UsageError(f"{option}: writing {target} would replace {label}; choose another {option}")
