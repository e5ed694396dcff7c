"""Progress reporting for long steps (matching passes, passes over data, training steps).

A bar is drawn with ``tqdm`` when it is installed, stderr is a terminal and progress is enabled;
otherwise progress goes to the ``logging`` module (INFO), at most about ten lines per loop. Tests
and pipes stay quiet. ``AUTOPERM_PROGRESS=0`` in the environment, or
``autoperm.set_progress(False)``, turns bars off; ``AUTOPERM_PROGRESS=1`` forces them on.

Example::

    from autoperm._progress import progress
    for batch in progress(loader, desc="activation statistics", total=len(loader)):
        ...
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator, TypeVar

__all__ = ["progress", "set_progress", "progress_enabled"]

T = TypeVar("T")
log = logging.getLogger("autoperm.progress")
_ENABLED: bool | None = None  # None: decide from the environment and the terminal


def set_progress(enabled: bool | None) -> None:
    """Turn progress bars on (True), off (False), or back to automatic (None: on for a terminal)."""
    global _ENABLED
    _ENABLED = enabled


def progress_enabled() -> bool:
    if _ENABLED is not None:
        return _ENABLED
    env = os.environ.get("AUTOPERM_PROGRESS")
    if env is not None:
        return env not in ("0", "false", "False", "")
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) and "PYTEST_CURRENT_TEST" not in os.environ


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    """Yield from ``iterable``, reporting progress as a bar or as log lines."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if progress_enabled():
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            yield from tqdm(iterable, desc=desc, total=total, leave=False)
            return
    every = max(1, (total or 100) // 10)
    n = 0
    for n, item in enumerate(iterable, 1):
        yield item
        if n % every == 0 and log.isEnabledFor(logging.INFO):
            log.info("%s: %d%s", desc, n, f"/{total}" if total else "")
