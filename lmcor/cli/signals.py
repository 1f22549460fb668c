"""SIGTERM taken as Ctrl-C, for commands whose work stops cleanly on KeyboardInterrupt (a training
keeps the step it reached, an export leaves its output folder as it was)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """Within: SIGTERM raises KeyboardInterrupt as SIGINT does; the list yielded holds it once it came,
    so that the command exits 143, not 130."""
    terminated: list[int] = []

    def interrupt(signum: int, _frame: object) -> None:
        terminated.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, previous)
