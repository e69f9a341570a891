"""A time budget for one request's model calls, so a slow image or encode answers 503, never hangs.

Work runs on a small bounded thread pool while the request thread waits at most until the deadline.
Work that misses the deadline is not interrupted (PyTorch cannot be): an image still being encoded
finishes and lands in the cache, so the retry that the 503 advises is fast. Work still queued when
its deadline passes is cancelled, which sheds load when every pool thread is busy.

Work made of steps (a pre-annotation batch: fetch, detect, encode, segment, chunk after chunk) stops
cooperatively instead: it asks its `TimeLimit` before each step, starts no step that the same step's last
duration says would end past the deadline, and hands back what it finished. Nothing of it then runs after
the request is answered.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from backend.errors import RETRY_AFTER_S, DeadlineExceeded

T = TypeVar("T")


class TimeLimit:
    """When a piece of work must be done by; `TimeLimit(None)` never expires."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.expires_at = time.monotonic() + seconds if seconds is not None else math.inf

    @classmethod
    def until_wall_clock(cls, epoch_s: float | None) -> TimeLimit:
        """The limit another machine set as a wall-clock time (a queue job's deadline; clocks kept by NTP)."""
        return cls(None if epoch_s is None else epoch_s - time.time())

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def wall_clock(self) -> float | None:
        """The limit as a wall-clock time, for work handed to another process; None when there is none."""
        return None if math.isinf(self.expires_at) else time.time() + self.remaining()

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the request took longer than PREDICT_DEADLINE ({self.seconds:.0f} s); work already finished is "
            f"cached, so retry in {RETRY_AFTER_S} s"
        )


NO_LIMIT = TimeLimit(None)


class StepTimes:
    """How long each kind of step took per image when it last ran in this process, so that work under a
    TimeLimit starts no step that would end past it. Shared by threads: each entry is one atomic store."""

    def __init__(self) -> None:
        self._per_image: dict[str, float] = {}

    def fits(self, step: str, images: int, limit: TimeLimit) -> bool:
        """Whether `step` over `images` images is expected to end before `limit` (a step never measured is
        expected to)."""
        return not limit.expired() and images * self._per_image.get(step, 0.0) < limit.remaining()

    def images_within(self, steps: tuple[str, ...], most: int, limit: TimeLimit) -> int:
        """How many images (1 to `most`) to take through `steps` next so that they end before `limit`: as many as
        the steps' last measured times per image say fit in the time left, at least one (whose own steps are
        checked as they start), and one alone while a step has never been measured, so that it is measured
        before a chunk is staked on it. Without a limit, `most`."""
        if math.isinf(limit.expires_at):
            return most
        per_image = self.per_image(steps)
        if per_image is None:
            return 1
        fitting = int(limit.remaining() / per_image) if per_image > 0 else most
        return min(max(fitting, 1), most)

    def per_image(self, steps: tuple[str, ...]) -> float | None:
        """The steps' last measured seconds per image together; None while one was never measured."""
        if any(step not in self._per_image for step in steps):
            return None
        return sum(self._per_image[step] for step in steps)

    @contextlib.contextmanager
    def step(self, step: str, images: int, limit: TimeLimit) -> Iterator[None]:
        """Run the body as one `step` over `images` images, timed; raise DeadlineExceeded instead when it would
        end past `limit`."""
        if not self.fits(step, images, limit):
            raise limit.exceeded()
        started = time.monotonic()
        yield
        if images:
            self._per_image[step] = (time.monotonic() - started) / images


class Deadline(TimeLimit):
    """Shared by every model call of one request: the budget is for the request, not for each call."""

    def __init__(self, pool: concurrent.futures.Executor, seconds: float) -> None:
        super().__init__(seconds)
        self.pool = pool

    def run(self, work: Callable[..., T], *args: object) -> T:
        remaining = self.remaining()
        if remaining <= 0:
            raise self.exceeded()
        future = self.pool.submit(work, *args)
        # wait(), not result(timeout): the work's own TimeoutError must not pass for a missed deadline.
        done, _ = concurrent.futures.wait([future], timeout=remaining)
        if not done:
            future.cancel()
            raise self.exceeded()
        return future.result()

    def run_in_steps(self, work: Callable[..., T], *args: object) -> T:
        """`work(*args, self)` for work that checks this deadline between its steps and returns what it has
        done when it passes. Once started it is waited for, so the answer comes when it has stopped (at most
        the rest of one step past the deadline); never started by the deadline (every pool thread busy), it
        is cancelled."""
        if self.expired():
            raise self.exceeded()
        future = self.pool.submit(work, *args, self)
        done, _ = concurrent.futures.wait([future], timeout=self.remaining())
        if not done and future.cancel():  # cancel() fails once the work runs: then it is waited for
            raise self.exceeded()
        return future.result()
