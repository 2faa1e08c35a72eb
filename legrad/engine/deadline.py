"""A cooperative time limit for one call: set by a front end, checked by the engine between units of work.

Threads cannot be stopped from outside, so a server that wants bounded requests sets a deadline
around its call (:func:`deadline`) and the engine calls :func:`check_deadline` between units of work
(the tower's blocks, explained layers, prompt chunks, query blocks). Past the deadline the next check
raises :class:`RequestTimeoutError`; the work already running (one matmul, one block, an image resize)
finishes first, so a request ends a little after its limit, never long after it.

The deadline lives in a :class:`contextvars.ContextVar`: each thread (and each asyncio task) has its
own, so concurrent requests do not share a limit, and code that sets none is never interrupted.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Iterator

__all__ = ["RequestTimeoutError", "deadline", "check_deadline", "time_left"]

# The clock deadlines are measured on (tests substitute a fake one).
_clock = time.monotonic
# (monotonic end time, the limit in seconds as given) of the innermost active deadline.
_DEADLINE: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar("legrad_deadline",
                                                                                        default=None)


class RequestTimeoutError(TimeoutError):
    """A call ran past the time limit set with :func:`deadline` and was stopped between two units of work.

    Attributes:
        limit_s: the limit in seconds.
    """

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        super().__init__(f"stopped after the time limit of {limit_s:g} s; try a smaller image size or fewer "
                         "prompts")


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Limits the work done inside the ``with`` block to ``seconds`` (None: no limit).

    Nested deadlines keep the earlier end time.

    Args:
        seconds: positive, finite time limit.

    Raises:
        ValueError: if ``seconds`` is not a positive finite number (before the block runs).
    """
    if seconds is None:
        yield
        return
    seconds = float(seconds)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"a time limit must be a positive number of seconds, got {seconds!r}")
    end = _clock() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set(outer if outer is not None and outer[0] <= end else (end, seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_left() -> float | None:
    """Seconds left before the active deadline (negative once past it); None when there is none."""
    active = _DEADLINE.get()
    return None if active is None else active[0] - _clock()


def check_deadline() -> None:
    """Raises :class:`RequestTimeoutError` if the active deadline has passed (a no-op without one).

    Raises:
        RequestTimeoutError: past the deadline.
    """
    active = _DEADLINE.get()
    if active is not None and _clock() > active[0]:
        raise RequestTimeoutError(active[1])
