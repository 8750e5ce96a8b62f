"""Progress reporting shared by calibration, the layer-wise engine and evaluation.

Bars go to stderr: stdout carries results (the JSON of ``compress run --json``, ``compress eval``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(
    progress: bool | Callable[[int, int], None] | None, total: int, description: str
) -> Iterator[Callable[..., None]]:
    """Yield an ``advance(n=1)`` to call after each ``n`` of ``total`` units of work.

    ``progress``: ``True``/``False`` for a rich progress bar, a callable ``(done, total)``, or ``None``
    for a bar only when there are more than 4 units.
    """
    use_bar = (progress is None and total > 4) or progress is True
    if not use_bar:
        done = 0

        def advance_cb(n: int = 1) -> None:
            nonlocal done
            done += n
            if callable(progress):
                progress(done, total)

        yield advance_cb
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        transient=True,
        console=Console(stderr=True),  # stdout carries results (JSON of `compress run --json`, `compress eval`)
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.update(task, advance=n)
