"""The prediction Label Studio asks for when an annotator opens a task without one (`/predict`, context null, one
task): the annotator waits for its answer before seeing the task, and GroundingDINO + SAM's encoder take tens of
seconds on a CPU.

So it waits TASK_OPEN_WAIT at most: a pre-annotation whose boxes and embedding were computed earlier (by this path,
a project run, a batch, or encoding ahead) is answered within it; one that is not is left running in the background
and answered "not yet" (the route sends `[]`, which Label Studio does not store, so the task opens at once and the
next open or "Retrieve predictions" asks again and finds the boxes and embedding cached). The background pass
encodes the image's embedding, so the first click on the task is warm. One pass at a time, at most
TASK_OPEN_BACKLOG waiting; a task opened again while its pass runs waits for that pass, never starts a second.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Hashable

from backend.errors import BackendError
from backend.images import redact_url
from backend.inference.base import Inference
from backend.protocol.label_config import ProjectConfig
from backend.protocol.results import TaskAnswer

log = logging.getLogger(__name__)

TASK_OPEN_BACKLOG = 16  # task-open passes waiting for the background thread; more answer "not yet" without one


class NotReady:
    """A task-open prediction still being computed in the background."""


NOT_READY = NotReady()


class TaskOpenPredictions:
    def __init__(self, predictor: Inference, wait_s: float) -> None:
        self.predictor = predictor
        self.wait_s = wait_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-open")
        self._passes: dict[Hashable, concurrent.futures.Future] = {}
        self._mutex = threading.Lock()

    def predict(
        self, image_url: object, config: ProjectConfig, project_id: int | None
    ) -> TaskAnswer | BackendError | NotReady:
        """The task's pre-annotation if done within `wait_s`, else NOT_READY while it goes on in the background.
        Errors of the request as a whole (PromptError) are raised, as `predict_batch` raises them."""
        key = (project_id, repr(image_url), repr(config))
        with self._mutex:
            running = self._passes.get(key)
            started = running is None
            if running is None:
                if len(self._passes) >= TASK_OPEN_BACKLOG:
                    log.warning("task-open pre-annotation: %d passes waiting, none started", len(self._passes))
                    return NOT_READY
                running = self._pool.submit(self.predictor.predict_batch, [image_url], config, project_id)
                self._passes[key] = running
        if started:
            # Outside the mutex: a pass that has already ended runs the callback here, at once, and the callback
            # takes the mutex.
            running.add_done_callback(lambda _: self._forget(key))
        try:
            (outcome,) = running.result(timeout=self.wait_s)
        except concurrent.futures.TimeoutError:
            log.info("task-open pre-annotation of %s goes on in the background", redact_url(str(image_url)))
            return NOT_READY
        return outcome

    def _forget(self, key: Hashable) -> None:
        with self._mutex:
            self._passes.pop(key, None)

    def wait_idle(self, timeout_s: float) -> bool:
        """True once no pass runs or waits (for tests and benchmarks)."""
        with self._mutex:
            passes = list(self._passes.values())
        done, not_done = concurrent.futures.wait(passes, timeout=timeout_s)
        return not not_done
