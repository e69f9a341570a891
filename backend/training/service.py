"""Active learning inside a running backend: answers webhooks at once and hands the recorded events on.

With INFERENCE=local a background thread here applies them and trainings run in background threads,
one at a time per project and TRAININGS_AT_ONCE in all. With INFERENCE=queue the web tier loads no model:
`dispatch` enqueues a job, and a worker calls `apply` and then `trainer.train_project` itself
(backend/worker/jobs.py), one job at a time. The worker reads the events from, and writes the training set
and versions to, the MODEL_DIR the web tier recorded them in and serves versions from: one folder both must
mount. Each checks it (`check_model_dir`), as a worker with a folder of its own would otherwise find nothing
to apply and say nothing.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from backend.config import Settings
from backend.decoders.serving import ProjectDecoders
from backend.errors import ModelDirNotShared, WebhookError
from backend.project_files import ProjectFiles, model_dir_identity
from backend.protocol.ids import is_label_studio_id
from backend.training.dataset import MaskLimits, TrainingSet
from backend.training.ingest import (
    ANNOTATION_SAVED,
    ANNOTATIONS_DELETED,
    LEARNED_FROM,
    START_TRAINING,
    Inbox,
    apply_pending,
    last_training,
    read_annotation_count,
)
from backend.training.support import fine_tuning_refusal

if TYPE_CHECKING:  # the models: the queue-mode web tier records events without importing them
    from backend.training.resources import TrainingResources

log = logging.getLogger(__name__)


MODEL_DIR_KEY = "sam:model-dir"  # the web tier's MODEL_DIR stamp, for workers to check theirs against


def model_dir_stamp(settings: Settings) -> dict:
    """Which MODEL_DIR this process uses: its identity, and where it is for people to read."""
    identity = model_dir_identity(settings.model_dir)
    return {"identity": identity, "path": str(settings.model_dir), "host": socket.gethostname()}


def check_model_dir(settings: Settings, web_tier: dict) -> None:
    """Raise ModelDirNotShared unless this process's MODEL_DIR is the one `web_tier` (its stamp) uses."""
    if model_dir_identity(settings.model_dir) != web_tier["identity"]:
        raise ModelDirNotShared(
            f"MODEL_DIR {settings.model_dir} on {socket.gethostname()} is not the web tier's MODEL_DIR"
            f" ({web_tier['path']} on {web_tier['host']}). With INFERENCE=queue the web tier records webhook"
            " events there and workers train from them and write the versions that serve, so the web tier and"
            " every worker must mount one shared folder (a network volume) as MODEL_DIR."
        )


def publish_model_dir(connection: redis.Redis, settings: Settings) -> None:
    """The web tier says in Redis which MODEL_DIR it uses, for workers to check theirs at start."""
    connection.set(MODEL_DIR_KEY, json.dumps(model_dir_stamp(settings)))


def check_published_model_dir(connection: redis.Redis, settings: Settings) -> None:
    """A worker's check at start, against the MODEL_DIR the web tier published (if one has yet)."""
    published = connection.get(MODEL_DIR_KEY)
    if published is None:
        log.info("no web tier has said which MODEL_DIR it uses yet; each training job checks it")
        return
    check_model_dir(settings, json.loads(published))


def _project_id(body: dict) -> int:
    project = body.get("project")
    project_id = project.get("id") if isinstance(project, dict) else None
    if not is_label_studio_id(project_id):
        raise WebhookError(f"{body.get('action')} webhook without a valid project.id")
    return project_id


def _check_shape(action: str, body: dict) -> None:
    if action in ANNOTATION_SAVED and not (
        isinstance(body.get("annotation"), dict) and isinstance(body.get("task"), dict)
    ):
        raise WebhookError(f"{action} webhook needs 'annotation' and 'task' objects")
    if action == ANNOTATIONS_DELETED and not isinstance(body.get("annotations"), list):
        raise WebhookError(f"{action} webhook needs an 'annotations' list")


@dataclass(frozen=True)
class LearningSettings:
    """The few settings `ActiveLearning` reads."""

    model_dir: str
    train_after_annotations: int
    trainings_at_once: int
    limits: MaskLimits
    refusal: str | None  # why the configured segmenter is not fine-tuned; None when it is

    @classmethod
    def of(cls, settings: Settings) -> LearningSettings:
        return cls(
            settings.model_dir,
            settings.train_after_annotations,
            settings.trainings_at_once,
            MaskLimits.of(settings),
            fine_tuning_refusal(settings),
        )


class ActiveLearning:
    def __init__(
        self,
        settings: LearningSettings,
        resources: Callable[[], TrainingResources] | None,
        decoders: ProjectDecoders,
        dispatch: Callable[[int], None] | None = None,
        train: Callable[[int], object] | None = None,
    ) -> None:
        """`resources` gives the loaded models (None where there are none); `dispatch(project_id)` hands
        recorded events to whoever applies them, by default this object's background thread, which trains a
        project with `train(project_id)` when one is due."""
        self.settings = settings
        self.resources = resources
        self.decoders = decoders
        self._dispatch = dispatch or self._enqueue
        self._train_project = train
        self._events: queue.Queue[int] = queue.Queue()
        self._mutex = threading.Lock()
        self._idle = threading.Condition(self._mutex)
        self._outstanding = 0  # queued projects plus running trainings
        self._training: set[int] = set()
        self._train_again: set[int] = set()
        self._training_slots = threading.BoundedSemaphore(settings.trainings_at_once)
        self._thread: threading.Thread | None = None
        self._started = False

    def start(self) -> None:
        """Hand on the events a previous process recorded but did not get applied: once per process, however often
        /health and /setup (which Label Studio polls) ask for a warm-up."""
        with self._mutex:
            if self._started:
                return
            self._started = True
        if refusal := self.settings.refusal:
            log.warning("active learning: %s", refusal)
        for project_id in ProjectFiles.projects(self.settings.model_dir):
            if Inbox(ProjectFiles(self.settings.model_dir, project_id)).pending():
                log.info("project %d: replaying recorded webhook events", project_id)
                self._dispatch(project_id)

    def replay_set_aside(self, project_id: int) -> int:
        """Put the project's set-aside events back in its inbox and hand them on, as a webhook would; returns how many.
        One that fails again is set aside again, with its new error."""
        replayed = Inbox(ProjectFiles(self.settings.model_dir, project_id)).replay_set_aside()
        if replayed:
            log.info("project %d: %d set-aside webhook events put back in the inbox", project_id, replayed)
            self._dispatch(project_id)
        return replayed

    def set_aside_counts(self) -> dict[str, int]:
        """Per project with any, how many webhook events are set aside (for /status)."""
        counts = {
            str(project_id): len(Inbox(ProjectFiles(self.settings.model_dir, project_id)).set_aside_paths())
            for project_id in ProjectFiles.projects(self.settings.model_dir)
        }
        return {project: count for project, count in counts.items() if count}

    def _enqueue(self, project_id: int) -> None:
        with self._mutex:
            if self._thread is None:
                self._thread = threading.Thread(target=self._apply_events, name="active-learning", daemon=True)
                self._thread.start()
            self._outstanding += 1
        self._events.put(project_id)

    def _done(self) -> None:
        with self._mutex:
            self._outstanding -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once no event waits and no training runs (for tests, benchmarks and shutdown)."""
        with self._mutex:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout_s)

    def receive(self, body: dict) -> dict:
        """Record a webhook and queue it; only cheap checks run here, in the webhook's 1 s."""
        action = body.get("action")
        if action not in LEARNED_FROM:
            return {"status": "ignored", "action": action, "reason": "not an event training uses"}
        project_id = _project_id(body)
        _check_shape(action, body)
        files = ProjectFiles(self.settings.model_dir, project_id)
        if action in (ANNOTATIONS_DELETED, START_TRAINING) and not files.root.is_dir():
            reason = f"project {project_id} has no training data here yet"
            log.warning("%s webhook ignored: %s", action, reason)
            return {"status": "ignored", "action": action, "project": project_id, "reason": reason}
        try:
            Inbox(files).record(body)
        except (ValueError, RecursionError) as error:  # JSON that parsed but cannot be written back
            raise WebhookError(f"{action} webhook cannot be recorded: {type(error).__name__}") from error
        self._dispatch(project_id)
        return {"status": "queued", "action": action, "project": project_id}

    def apply(self, project_id: int) -> bool:
        """Apply the project's recorded events now; True if a training is due."""
        if self.resources is None:
            raise RuntimeError("applying events needs the models; this process has none loaded")
        outcome = apply_pending(ProjectFiles(self.settings.model_dir, project_id), self.resources, self.settings.limits)
        threshold = self.settings.train_after_annotations
        # Only new annotations count towards the threshold: a round that stored none leaves the count
        # to the training it already started.
        enough = threshold > 0 and outcome.stored > 0 and outcome.annotation_count >= threshold
        return outcome.training_requested or enough

    def _apply_events(self) -> None:
        while True:
            project_id = self._events.get()
            try:
                if self.apply(project_id):
                    self.request_training(project_id)
            except Exception:  # the thread must survive whatever one project's events do
                log.exception("project %d: applying webhook events failed", project_id)
            finally:
                self._done()

    def request_training(self, project_id: int) -> None:
        """Train in a background thread; a request while one runs makes it run once more afterwards."""
        with self._mutex:
            if project_id in self._training:
                self._train_again.add(project_id)
                return
            self._training.add(project_id)
            self._outstanding += 1
        threading.Thread(target=self._train, args=(project_id,), name=f"train-{project_id}", daemon=True).start()

    def _train(self, project_id: int) -> None:
        try:
            while True:
                if self._train_project is None:
                    raise RuntimeError("this process does not train; its dispatch hands events to a worker")
                if not self._training_slots.acquire(blocking=False):
                    log.info(
                        "project %d: training waits for one running (TRAININGS_AT_ONCE=%d)",
                        project_id,
                        self.settings.trainings_at_once,
                    )
                    self._training_slots.acquire()
                try:
                    self._train_project(project_id)
                except Exception:  # recorded as the project's last training by train_project
                    log.exception("project %d: training failed", project_id)
                finally:
                    self._training_slots.release()
                with self._mutex:
                    if project_id not in self._train_again:
                        self._training.discard(project_id)
                        return
                    self._train_again.discard(project_id)
        finally:
            self._done()

    def describe(self, project_id: int) -> dict:
        """/versions for one project: its versions, training set, and training state."""
        files = ProjectFiles(self.settings.model_dir, project_id)
        training_set = TrainingSet(files)
        return {
            **self.decoders.describe(project_id),
            "fine_tuning": self.fine_tuning(),
            "training_set": {**training_set.summary(), "rejected_regions": len(training_set.rejections())},
            "annotations_since_training": read_annotation_count(files),
            "set_aside_events": Inbox(files).set_aside_events(),
            "training": {
                "running_here": project_id in self._training,
                "train_after_annotations": self.settings.train_after_annotations,
                "last": last_training(files),
            },
        }

    def describe_all(self) -> dict:
        return {
            "fine_tuning": self.fine_tuning(),
            "projects": [self.describe(project_id) for project_id in ProjectFiles.projects(self.settings.model_dir)],
        }

    def fine_tuning(self) -> dict:
        """Whether trainings can fine-tune the configured segmenter, and why not."""
        refusal = self.settings.refusal
        return {"supported": refusal is None, "reason": refusal}
