"""Where texts and task data come from: ``$COMPRESS_ASSETS`` when it is set, else what the package ships.

The package ships the WikiText-2 raw validation and test splits (``compress/data/``, gzip, CC BY-SA
3.0, attributed in ``compress/data/README.md``), byte-identical to the assets folder's copies, so the
default calibration text (``wikitext2``) and perplexity text work with nothing else installed.
``$COMPRESS_ASSETS`` (the shared assets folder of the tests and benchmarks: models, TinyStories, the
lm-eval task data) stays an override and the only source of everything else.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

from compress.errors import UsageError

#: The package's own data folder.
PACKAGE_DATA = Path(__file__).resolve().parent / "data"


def assets_root(required: bool = True) -> Path | None:
    """``$COMPRESS_ASSETS`` as a folder; a one-line :class:`UsageError` when required and absent."""
    value = os.environ.get("COMPRESS_ASSETS")
    if value and Path(value).is_dir():
        return Path(value)
    if not required:
        return None
    if not value:
        raise UsageError(
            "COMPRESS_ASSETS is not set; point it at the assets folder (it holds data/ and models/)"
        )
    raise UsageError(f"COMPRESS_ASSETS={value} is not a folder; point it at the assets folder")


def asset_file(*parts: str) -> Path:
    """A file of the assets folder (``$COMPRESS_ASSETS/<parts>``); one-line error when it is missing."""
    root = assets_root()
    assert root is not None
    path = root.joinpath(*parts)
    if not path.is_file():
        raise UsageError(f"missing asset {path}; is COMPRESS_ASSETS={root} the complete assets folder?")
    return path


def display_path(path: str | None) -> str | None:
    """What records and model cards say about a user's path: an absolute path becomes its file name
    (folders travel to other machines and hubs; a local path leaks and is wrong there). Aliases,
    ``hf:`` specs, hub ids and relative paths are unchanged."""
    if path is None:
        return None
    return Path(path).name if os.path.isabs(os.path.expanduser(path)) else path


def data_text(rel: str) -> tuple[str, str]:
    """The text of data file ``rel`` (e.g. ``wikitext-2-raw/wiki.test.raw``) and where it came from.

    ``$COMPRESS_ASSETS/data/<rel>`` when ``$COMPRESS_ASSETS`` is set (an override: its copy is used
    even where the package has one), else the package's gzip copy; a one-line error naming both when
    neither has it. ``where`` is ``$COMPRESS_ASSETS/data/<rel>`` or ``package:compress/data/<rel>``,
    never an absolute path (it goes into records and model cards). A ``$COMPRESS_ASSETS`` that is set
    but is not a folder is an error, not a silent fallback."""
    root = assets_root(required=True) if os.environ.get("COMPRESS_ASSETS") else None
    if root is not None:
        path = root / "data" / rel
        if path.is_file():
            return path.read_text(encoding="utf-8"), f"$COMPRESS_ASSETS/data/{rel}"
    packaged = PACKAGE_DATA / f"{rel}.gz"
    if packaged.is_file():
        with gzip.open(packaged, "rt", encoding="utf-8") as f:
            return f.read(), f"package:compress/data/{rel}"
    where = f"$COMPRESS_ASSETS/data/{rel}" if root is not None else "$COMPRESS_ASSETS (not set)"
    raise UsageError(f"{rel} is neither in {where} nor shipped with compress; set COMPRESS_ASSETS to the "
                     "assets folder, or pass a text file path instead")


def wikitext_join(raw: str) -> str:
    """WikiText-2 raw file -> the text used by GPTQ, SparseGPT, LLM-Pruner and SliceGPT.

    The raw file holds one HF dataset row per line (empty rows written as ``" "``); the protocol
    joins the rows with ``"\\n\\n"``, where non-empty rows keep their trailing newline — which is
    ``"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split=...)["text"])``.
    """
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
    return "\n\n".join(rows)


def wikitext2(split: str) -> tuple[str, str]:
    """WikiText-2 raw ``split`` (``test`` or ``valid``) joined by the papers' protocol, and its origin."""
    if split not in ("test", "valid"):
        raise UsageError(f"unknown WikiText-2 split {split!r}; use 'test' or 'valid'")
    raw, where = data_text(f"wikitext-2-raw/wiki.{split}.raw")
    return wikitext_join(raw), where
