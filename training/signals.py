"""Pre-emption: SIGTERM and SIGINT ask the run to stop at the next safe point.

A pre-empted pod gets a few seconds between SIGTERM and SIGKILL, too few for a long save, so a
signal does not start one: the loop stops between two env steps or two optimizer steps and the
last committed generation is the recovery point. A signal that arrives while a checkpoint is
being written lets that save finish first (it is the commit the resume will use). A second
SIGINT (Ctrl-C twice) interrupts at once.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from config import UserError


class StopRequested(UserError):
    """The run stopped because of a signal; ``signum`` says which."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


_received: list[int] = []


def stop_requested() -> int | None:
    """The signal number that asked for a stop, or None."""
    return _received[0] if _received else None


def check_stop(where: str) -> None:
    """Raise StopRequested if a stop signal has arrived (call at safe points only)."""
    signum = stop_requested()
    if signum is not None:
        raise StopRequested(f"stopped by {signal.Signals(signum).name} {where}", signum)


def _handle(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGINT and _received:
        raise KeyboardInterrupt
    _received.append(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT request a stop instead of killing the process."""
    _received.clear()  # before the handlers: a signal arriving as they are installed counts
    previous = {sig: signal.signal(sig, _handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()
