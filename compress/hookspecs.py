"""Plugin hook specifications (pluggy project name ``compress``).

A plugin is any importable object (usually a module) with ``@hookimpl`` functions, exposed through
an entry point in the ``compress`` group::

    [project.entry-points.compress]
    my_method = "my_package.plugin"
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "compress"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_pruners(register: Callable[..., None]) -> None:
    """Call ``register(PrunerClass, aliases=())`` for every pruning method the plugin provides."""


@hookspec
def register_architectures(register: Callable[..., None]) -> None:
    """Call ``register(AdapterClass)`` for model families (``AdapterClass.model_types``)."""

