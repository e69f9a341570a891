"""Loads the models once, off the request path, so /health and /setup answer at once while it runs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from backend.errors import ModelNotReady

log = logging.getLogger(__name__)

T = TypeVar("T")


class BackgroundLoader(Generic[T]):
    """Runs `load` in a daemon thread on first `start()`; `get()` waits for it up to a deadline."""

    def __init__(self, load: Callable[[], T]) -> None:
        self._load = load
        self._value: T | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._started = False
        self._mutex = threading.Lock()

    def start(self) -> None:
        with self._mutex:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._run, name="model-loader", daemon=True).start()

    def _run(self) -> None:
        try:
            self._value = self._load()
        except BaseException as error:  # reported through get(), never lost in a thread
            log.error("loading the models failed: %s", error)
            self._error = error
        finally:
            self._done.set()

    @property
    def state(self) -> str:
        if not self._done.is_set():
            return "loading" if self._started else "not started"
        return "failed" if self._error is not None else "ready"

    @property
    def error(self) -> str | None:
        return str(self._error) if self._error is not None else None

    def get(self, timeout_s: float) -> T:
        self.start()
        if not self._done.wait(timeout_s):
            raise ModelNotReady("the models are still loading; retry in a few seconds")
        if self._error is not None:
            raise ModelNotReady(f"the models failed to load: {self._error}")
        return self._value  # type: ignore[return-value]
