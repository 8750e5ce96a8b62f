"""Bounded reads of user files and strict JSON writes: the one place every input/output goes through.

Reading (recipes, config.json, calibration text):

* only regular files: a FIFO would block ``open()`` forever, ``/dev/zero`` never ends, a directory is
  not text; the file is opened non-blocking and checked with ``fstat`` before a byte is read;
* at most a cap of bytes (:mod:`compress.io.limits`), read in one bounded ``read`` (a file that grows while
  it is read is still capped);
* YAML without aliases or anchors (a 450-byte "billion laughs" document expands to gigabytes), without
  duplicate keys (the last one would win silently) and nested at most :data:`~compress.io.limits.MAX_NESTING`
  deep; JSON the same (duplicate keys, depth, no ``NaN``/``Infinity``), never a ``RecursionError``.

Writing: :func:`dumps_json` turns NaN/inf into ``null`` and then refuses anything non-standard
(``allow_nan=False``), so every JSON file and ``--json`` output is valid JSON.
:func:`respect_umask` gives folders made by ``tempfile.mkdtemp`` (0700) and files made by ``mkstemp``
(0600) the permissions a plain ``mkdir``/``open`` would have had once they become the user's output.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compress.errors import UsageError
from compress.io.limits import MAX_NESTING, human_bytes

ErrorType = Callable[[str], Exception]


# ------------------------------------------------------------------ bounded reads
def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(path: str | os.PathLike, cap: int, what: str, error: ErrorType = UsageError) -> bytes:
    """The bytes of the regular file ``path``, at most ``cap`` of them (else ``error``, one line; one over
    the cap has ``too_large = True``).

    ``what`` names the file in messages ("recipe file", "calibration file"). The file is opened with
    ``O_NONBLOCK`` so that a FIFO is refused instead of waiting for a writer."""
    p = str(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise error(f"{what} {p} is a folder, not a file; point at a file") from None
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {p} is {_kind(st.st_mode)}, not a regular file; point at a file")
        if st.st_size > cap:
            raise _too_large(error(f"{what} {p} is {human_bytes(st.st_size)}, above the {human_bytes(cap)} "
                                   "limit; use a smaller file"))
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read(cap + 1)
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > cap:  # it grew while being read
        raise _too_large(error(f"{what} {p} is above the {human_bytes(cap)} limit; use a smaller file"))
    return data


def _too_large(e: Exception) -> Exception:
    """Mark a refusal as "over the size cap" (``e.too_large``), so that a caller can word its own."""
    e.too_large = True  # type: ignore[attr-defined]
    return e


def read_text(path: str | os.PathLike, cap: int, what: str, error: ErrorType = UsageError) -> str:
    """:func:`read_bytes` decoded as UTF-8 (a one-line ``error`` if it is not)."""
    data = read_bytes(path, cap, what, error)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


# ------------------------------------------------------------------ strict parsing
class _Refused(ValueError):
    """A document a strict loader refuses (message without the file name)."""


def check_depth(obj: Any, max_depth: int = MAX_NESTING) -> None:
    """Raise :class:`ValueError` when ``obj`` (parsed JSON/YAML) nests lists/dicts deeper than ``max_depth``.
    Iterative: never a ``RecursionError``."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list, tuple)):
            if d > max_depth:
                raise _Refused(f"is nested more than {max_depth} levels deep")
            children = x.values() if isinstance(x, dict) else x
            stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list, tuple)))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"has the key {key!r} twice (the last one would win silently); keep one")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Refused(f"holds {name}, which is not JSON; write a finite number or null")


def parse_json(text: str, where: str, error: ErrorType = UsageError, *, max_depth: int = MAX_NESTING,
               allow_nan: bool = False) -> Any:
    """``json.loads`` of ``text`` that refuses duplicate keys, nesting deeper than ``max_depth`` and (unless
    ``allow_nan``) ``NaN``/``Infinity``. Every problem is one line ``error``, naming ``where``."""
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates,
                          **({} if allow_nan else {"parse_constant": _no_constant}))
    except _Refused as e:
        raise error(f"{where} {e}") from None
    except RecursionError:
        raise error(f"{where} is nested more than {max_depth} levels deep") from None
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        check_depth(data, max_depth)
    except _Refused as e:
        raise error(f"{where} {e}") from None
    return data


def read_json_object(path: str | os.PathLike, cap: int, what: str, fix: str, error: ErrorType = UsageError) -> dict[str, Any]:
    """The JSON object in the regular file ``path`` (at most ``cap`` bytes, parsed by :func:`parse_json`).

    Every problem (unreadable, too large, not UTF-8, not JSON, not an object) is one line ``error``
    naming ``what`` and ending with ``fix`` (what the user should do about it)."""
    def fail(msg: str) -> Exception:
        return error(f"{msg}; {fix}")

    data = parse_json(read_text(path, cap, what, fail), f"{what} {path}", fail)
    if not isinstance(data, dict):
        raise error(f"{what} {path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def _strict_loader(max_depth: int) -> type:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """SafeLoader that refuses aliases and anchors (exponential expansion), duplicate keys, and nesting
        deeper than ``max_depth`` (PyYAML composes recursively: a deep document is a RecursionError)."""

        _depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            line = event.start_mark.line + 1 if event.start_mark else "?"
            if isinstance(event, yaml.AliasEvent):
                raise _Refused(f"uses the alias *{event.anchor} (line {line}); aliases are refused since they can "
                               "expand exponentially: write the value out")
            if getattr(event, "anchor", None) is not None:
                raise _Refused(f"defines the anchor &{event.anchor} (line {line}); anchors and aliases are "
                               "refused: write the value out")
            self._depth += 1
            try:
                if self._depth > max_depth:
                    raise _Refused(f"is nested more than {max_depth} levels deep (line {line})")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                self.flatten_mapping(node)  # merge keys (``<<``) first, as SafeConstructor does
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                    seen.add(key)
                except TypeError:  # unhashable: the base class says so
                    break
                if dup:
                    raise _Refused(f"has the key {key!r} twice (line {key_node.start_mark.line + 1}; the last one "
                                   "would win silently); keep one")
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def parse_yaml(text: str, where: str, error: ErrorType = UsageError, *, max_depth: int = MAX_NESTING) -> Any:
    """``yaml.safe_load`` of ``text`` without aliases/anchors, duplicate keys or nesting deeper than
    ``max_depth``; every problem is one line ``error`` naming ``where``."""
    import yaml

    try:
        return yaml.load(text, Loader=_strict_loader(max_depth))  # noqa: S506 - a SafeLoader subclass
    except _Refused as e:
        raise error(f"{where} {e}") from None
    except RecursionError:
        raise error(f"{where} is nested more than {max_depth} levels deep") from None
    except yaml.YAMLError as e:
        raise error(f"{where} is not valid YAML: {' '.join(str(e).split())[:200]}") from None


# ------------------------------------------------------------------ strict writes
def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None (dict keys as strings, tuples as lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) and k is not None else k: finite_or_none(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes standard JSON: NaN/inf become ``null`` (explicitly, not
    ``NaN``/``Infinity``), ``allow_nan=False`` guards the rest. Other keyword arguments as json.dumps."""
    kwargs.pop("allow_nan", None)
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


# ------------------------------------------------------------------ permissions
def current_umask() -> int:
    """The process umask (read without changing it where /proc allows, else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a folder, recursively, or a file) the modes ``mkdir``/``open`` would have given it
    under the current umask: ``tempfile`` makes folders 0700 and files 0600 whatever the umask, which
    is right for scratch space and wrong once the scratch folder is renamed into the user's output."""
    mask = current_umask()
    root = Path(path)
    dmode, fmode = 0o777 & ~mask, 0o666 & ~mask
    items = [root, *root.rglob("*")] if root.is_dir() and not root.is_symlink() else [root]
    for p in items:
        if p.is_symlink():
            continue
        with contextlib.suppress(OSError):  # not ours to change (another owner): leave it
            os.chmod(p, dmode if p.is_dir() else fmode)
