"""The example plugin passes the conformance suite every method must pass, and prunes by its score.

The distribution need not be installed: its module is imported from this checkout (``tox -e plugins``
installs it and checks that ``compress`` discovers it through its entry point)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress_wanda_sp.wanda_sp import WandaSP  # noqa: E402

from compress.testing import check_pruner, tiny_tokenizer  # noqa: E402


def test_wanda_sp_conforms(tmp_path):
    if tiny_tokenizer() is None:
        pytest.skip("needs $COMPRESS_ASSETS (stories260k tokenizer and tinystories text)")
    report = check_pruner(WandaSP, tmp_dir=tmp_path, kinds=("llama-gqa",), targets=("60%", "kv:50%"))
    assert len(report) == 2
