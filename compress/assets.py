"""The shared assets folder (``$COMPRESS_ASSETS``): real models and texts for tests and benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path

from compress.errors import UsageError


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
    root = assets_root()
    assert root is not None
    path = root.joinpath(*parts)
    if not path.is_file():
        raise UsageError(f"missing asset {path}; is COMPRESS_ASSETS={root} the complete assets folder?")
    return path
