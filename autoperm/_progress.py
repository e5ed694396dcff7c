"""Progress reporting for long steps (matching passes, passes over data, training steps).

A bar is drawn with ``tqdm`` when it is installed, stderr is a terminal and progress is enabled;
otherwise progress goes to the ``logging`` module (INFO), at most about ten lines per loop, each
with the time spent and, where the total is known, an estimate of the time left. Tests
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
import time
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
    t0 = time.perf_counter()
    for n, item in enumerate(iterable, 1):
        yield item
        if n % every == 0 and log.isEnabledFor(logging.INFO):
            log.info("%s: %s", desc, _status(n, total, time.perf_counter() - t0))


def _status(n: int, total: int | None, elapsed: float) -> str:
    """``"30/100 (12 s, about 28 s left)"``: steps done, time spent, and the time left at the
    rate so far (when the total is known)."""
    text = f"{n}/{total}" if total else f"{n}"
    left = f", about {_seconds(elapsed / n * (total - n))} left" if total and n < total else ""
    return f"{text} ({_seconds(elapsed)}{left})"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"
