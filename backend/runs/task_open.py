"""The prediction Label Studio asks for when an annotator opens a task without one (`/predict`, context null, one
task): the annotator waits for its answer before seeing the task, and GroundingDINO + SAM's encoder take tens of
seconds on a CPU.

So it waits TASK_OPEN_WAIT at most: a pre-annotation whose boxes and embedding were computed earlier (by this path,
a project run, a batch, or encoding ahead) is answered within it; one that is not is left running in the background
and answered "not yet" (the route sends `[]`, which Label Studio does not store, so the task opens at once). The
background pass encodes the image's embedding, so the first click on the task is warm, and its answer is not thrown
away: with Label Studio's API (LABEL_STUDIO_URL and a key) it is imported as the task's prediction, which the task
shows when it is opened again; without it, or when the import fails, it is kept (TASK_OPEN_KEPT at most) and the
next open of the task is answered with it at once, whatever the machine's load. One pass at a time, at most
TASK_OPEN_BACKLOG waiting; a task opened again while its pass runs waits for that pass, never starts a second.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Hashable

from backend.errors import BackendError, ProjectApiError
from backend.images import redact_url
from backend.inference.base import Inference
from backend.protocol.ids import is_label_studio_id
from backend.protocol.label_config import ProjectConfig
from backend.protocol.project_api import ProjectApi
from backend.protocol.results import TaskAnswer

log = logging.getLogger(__name__)

TASK_OPEN_BACKLOG = 16  # task-open passes waiting for the background thread; more answer "not yet" without one
TASK_OPEN_KEPT = 64  # answers finished after their open was answered "not yet", kept for the next open


class NotReady:
    """A task-open prediction still being computed in the background."""


NOT_READY = NotReady()


class TaskOpenPredictions:
    def __init__(self, predictor: Inference, wait_s: float, label_studio: ProjectApi | None = None) -> None:
        self.predictor = predictor
        self.wait_s = wait_s
        self.label_studio = label_studio  # where answers finished too late for their open are imported
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-open")
        self._passes: dict[Hashable, concurrent.futures.Future] = {}
        self._late: dict[Hashable, object] = {}  # passes whose open was answered "not yet": the task's id
        self._kept: collections.OrderedDict[Hashable, TaskAnswer] = collections.OrderedDict()
        self._mutex = threading.Lock()

    def predict(
        self, image_url: object, config: ProjectConfig, project_id: int | None, task_id: object = None
    ) -> TaskAnswer | BackendError | NotReady:
        """The task's pre-annotation if done within `wait_s` (or kept from an earlier open's pass), else NOT_READY
        while it goes on in the background. Errors of the request as a whole (PromptError) are raised, as
        `predict_batch` raises them."""
        key = (project_id, repr(image_url), repr(config))
        with self._mutex:
            kept = self._kept.pop(key, None)
            if kept is not None:
                return kept
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
            running.add_done_callback(lambda done: self._finished(key, project_id, done))
        try:
            (outcome,) = running.result(timeout=self.wait_s)
        except concurrent.futures.TimeoutError:
            with self._mutex:
                if not running.done():  # else its answer is read below: it ended while the wait gave up
                    self._late[key] = task_id
                    log.info("task-open pre-annotation of %s goes on in the background", redact_url(str(image_url)))
                    return NOT_READY
            (outcome,) = running.result()
        with self._mutex:
            self._late.pop(key, None)  # answered now: an earlier open's wait for the same pass gave up
        return outcome

    def _finished(self, key: Hashable, project_id: int | None, done: concurrent.futures.Future) -> None:
        """A pass ended: an answer its open could not wait for goes to Label Studio, else is kept for the next open.
        The pass counts as running until that is done (`wait_idle`); an open meanwhile reads its answer."""
        try:
            with self._mutex:
                late = key in self._late
                task_id = self._late.pop(key, None)
            if not late or done.cancelled() or done.exception() is not None:
                return
            (outcome,) = done.result()
            if not isinstance(outcome, TaskAnswer) or self._imported(project_id, task_id, outcome):
                return
            with self._mutex:
                self._kept[key] = outcome
                while len(self._kept) > TASK_OPEN_KEPT:
                    self._kept.popitem(last=False)
        finally:
            with self._mutex:
                self._passes.pop(key, None)

    def _imported(self, project_id: int | None, task_id: object, answer: TaskAnswer) -> bool:
        """Import the answer as the task's prediction unless the task holds one of its model_version already; True
        when Label Studio has one now."""
        if self.label_studio is None or project_id is None or not is_label_studio_id(task_id):
            return False
        version = answer.entry.get("model_version", "")
        try:
            if version not in self.label_studio.prediction_versions(task_id):
                self.label_studio.push_predictions(project_id, [{"task": task_id, **answer.entry}])
        except ProjectApiError as error:
            log.warning("task %s: its pre-annotation is kept for its next open, not imported: %s", task_id, error)
            return False
        log.info("task %s: its pre-annotation, finished after the task opened, is imported into Label Studio", task_id)
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """True once no pass runs or waits, its answer delivered (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._mutex:
                if not self._passes:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
