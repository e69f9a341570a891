"""A time budget for one request's model calls, so a slow image or encode answers 503, never hangs.

Work runs on a small bounded thread pool while the request thread waits at most until the deadline.
Work that misses the deadline is not interrupted (PyTorch cannot be): an image still being encoded
finishes and lands in the cache, so the retry that the 503 advises is fast. Work still queued when
its deadline passes is cancelled, which sheds load when every pool thread is busy.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import TypeVar

from backend.errors import RETRY_AFTER_S, DeadlineExceeded

T = TypeVar("T")


class Deadline:
    """Shared by every model call of one request: the budget is for the request, not for each call."""

    def __init__(self, pool: concurrent.futures.Executor, seconds: float) -> None:
        self.pool = pool
        self.seconds = seconds
        self.expires_at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def _exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the request took longer than PREDICT_DEADLINE ({self.seconds:g} s); work already started goes on "
            f"(an image being encoded will be cached), so retry in {RETRY_AFTER_S} s"
        )

    def run(self, work: Callable[..., T], *args: object) -> T:
        remaining = self.remaining()
        if remaining <= 0:
            raise self._exceeded()
        future = self.pool.submit(work, *args)
        # wait(), not result(timeout): the work's own TimeoutError must not pass for a missed deadline.
        done, _ = concurrent.futures.wait([future], timeout=remaining)
        if not done:
            future.cancel()
            raise self._exceeded()
        return future.result()
