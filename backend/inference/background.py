"""INFERENCE=local's encoding ahead of the annotator: a pool of one thread, below every request.

Work comes in as named drains (`schedule(name, step)`): the thread calls `step()` until it answers False, so the
work's data stays where it was recorded (the imported-task list on disk, the few tasks to prefetch) and nothing is
queued per image. A drain already scheduled is not scheduled twice; asked again while it runs, it runs once more
when it ends, so a task recorded while the thread finished is not left behind. One thread: at most one encode
competes with the clicks for the CPU.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class BackgroundEncoder:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-ahead")
        self._mutex = threading.Lock()
        self._idle = threading.Condition(self._mutex)
        self._scheduled: set[Hashable] = set()
        self._again: set[Hashable] = set()

    def schedule(self, name: Hashable, step: Callable[[], bool]) -> None:
        """Run `step` in the background until it answers False (nothing left)."""
        with self._mutex:
            if name in self._scheduled:
                self._again.add(name)
                return
            self._scheduled.add(name)
        self._pool.submit(self._drain, name, step)

    def _drain(self, name: Hashable, step: Callable[[], bool]) -> None:
        try:
            while True:
                try:
                    while step():
                        pass
                except Exception:  # the thread must survive whatever one image does
                    log.exception("encoding ahead (%s) failed", name)
                with self._mutex:
                    if name not in self._again:
                        return
                    self._again.discard(name)
        finally:
            with self._mutex:
                self._scheduled.discard(name)
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing is scheduled (for tests, benchmarks and shutdown)."""
        with self._mutex:
            return self._idle.wait_for(lambda: not self._scheduled, timeout_s)
