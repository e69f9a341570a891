"""Webhook events → the project's training set: recorded durably within the webhook's 1 s, applied later.

Label Studio drops a webhook that takes over a second and never resends it, so the handler only writes
the event to the project's inbox (one file, flushed, renamed into place) and returns. A background
thread then applies inbox files in arrival order: decodes the masks, fetches the image to check their
size and cache its embedding, stores or drops the annotation, and removes the file only once its effect
is stored, so a crash replays it (applying is idempotent). An event that fails unexpectedly is set aside in
failed/ with its error; so is one whose applying killed the process EVENT_ATTEMPTS times (each attempt is
counted on disk before it starts), so that an event that runs the process out of memory cannot make every
restart die again. A stop that is announced is no crash: a stop signal (a deploy's SIGTERM, gunicorn's time-out
SIGABRT, a worker's warm shutdown) or a queue job's time-out takes back the attempts in progress
(`interrupt_applying`), so only a death nobody announced (an out-of-memory kill, a segfault) counts. Set-aside
events are listed by /versions and /status and put back with `python -m backend inbox replay --project ID`.
Regions that cannot be learnt from are logged and listed in rejections.jsonl.
Secrets in the payload's project object (its token, task data password) are not written.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backend.cache.locks import file_lock
from backend.errors import ConfigError, ImageError, ModelNotReady, Rejected
from backend.project_files import ProjectFiles, write_atomically
from backend.protocol.ids import is_label_studio_id
from backend.protocol.label_config import parse_label_config
from backend.training.dataset import MaskLimits, TrainingSet, record_from_webhook

if TYPE_CHECKING:  # the models: the queue-mode web tier records events without importing them
    from backend.training.resources import TrainingResources

log = logging.getLogger(__name__)

ANNOTATION_SAVED = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED")
ANNOTATIONS_DELETED = "ANNOTATIONS_DELETED"
START_TRAINING = "START_TRAINING"
LEARNED_FROM = (*ANNOTATION_SAVED, ANNOTATIONS_DELETED, START_TRAINING)
EVENT_ATTEMPTS = 3  # applies of one event that may end with the process dead before it is set aside


def read_annotation_count(files: ProjectFiles) -> int:
    """Annotations stored since the last training started."""
    try:
        return int(json.loads(files.state.read_text()).get("annotations_since_training", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def write_annotation_count(files: ProjectFiles, count: int) -> None:
    """Callers hold the project's ingest lock."""
    write_atomically(files.state, json.dumps({"annotations_since_training": count}).encode())


def stored_event(body: dict) -> dict:
    """The parts of a webhook body that training needs, without the project's secrets."""
    project = body.get("project") or {}
    kept = {key: body[key] for key in ("action", "annotation", "annotations", "task") if key in body}
    return {**kept, "project": {"id": project.get("id"), "label_config": project.get("label_config")}}


class _AttemptsInProgress:
    """The events this process is applying now, so that an announced stop can take their counted attempt back.

    A stop arrives as a signal, which Python handles in the main thread between two bytecodes, possibly in the
    middle of `begin`/`end` on that same thread (a queue worker applies events in its main thread): hence a
    re-entrant lock, the event registered before its attempt is written, and the check after writing it."""

    def __init__(self) -> None:
        self._mutex = threading.RLock()
        self._before: dict[Path, int] = {}  # event being applied -> attempts counted before this one
        self._interrupted: set[Path] = set()
        self.stopping: str | None = None  # why this process stops, once it does: later attempts are not counted

    def begin(self, event: Path, attempts_path: Path) -> int:
        with self._mutex:
            try:
                before = int(attempts_path.read_text())
            except (OSError, ValueError):
                before = 0
            self._before[event] = before
            if self.stopping is not None:
                return before
            write_atomically(attempts_path, str(before + 1).encode())
            if event in self._interrupted:  # a stop signal arrived while the attempt was being written
                self._take_back(event, attempts_path, before)
                return before
            return before + 1

    def end(self, event: Path, finish: Callable[[], None]) -> None:
        """`finish` moves the event on; under the lock, so that no stop writes its attempts back meanwhile."""
        with self._mutex:
            finish()
            self._before.pop(event, None)
            self._interrupted.discard(event)

    def interrupted(self, event: Path) -> bool:
        with self._mutex:
            return event in self._interrupted

    def interrupt(self, reason: str, stopping: bool) -> None:
        with self._mutex:
            if stopping:
                self.stopping = reason
            for event, before in self._before.items():
                if event not in self._interrupted:
                    self._take_back(event, Inbox.attempts_path(event), before)
                    log.warning("event %s: %s; this attempt at applying it is not counted", event, reason)

    def _take_back(self, event: Path, attempts_path: Path, before: int) -> None:
        self._interrupted.add(event)
        if before:
            write_atomically(attempts_path, str(before).encode())
        else:
            attempts_path.unlink(missing_ok=True)


_IN_PROGRESS = _AttemptsInProgress()


def process_stopping() -> str | None:
    """Why this process was told to stop (`interrupt_applying` with `stopping`), or None while it runs on."""
    return _IN_PROGRESS.stopping


def interrupt_applying(reason: str, stopping: bool = True) -> None:
    """This process is told to stop (`stopping`), or the job applying events timed out: the attempts at the events
    it is applying are taken back, so that its end does not count towards setting them aside; once it stops, none
    is counted any more. Safe to call from a signal handler."""
    _IN_PROGRESS.interrupt(reason, stopping)


class Inbox:
    """Recorded events of one project, in arrival order, and those set aside."""

    def __init__(self, files: ProjectFiles) -> None:
        self.files = files

    def record(self, body: dict) -> Path:
        path = self.files.inbox / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        write_atomically(path, json.dumps(stored_event(body)).encode())
        return path

    def pending(self) -> list[Path]:
        return sorted(self.files.inbox.glob("*.json")) if self.files.inbox.is_dir() else []

    @staticmethod
    def attempts_path(event: Path) -> Path:
        return event.with_suffix(".attempts")

    def begin_attempt(self, event: Path) -> int:
        """Count one more attempt at applying `event`, durably, before it starts (none once this process is stopping);
        returns the count. Each begun attempt is ended by `applied`, `set_aside` or `end_attempt`."""
        return _IN_PROGRESS.begin(event, self.attempts_path(event))

    def interrupted(self, event: Path) -> bool:
        """Whether an announced stop or a job time-out took back the attempt in progress at `event`."""
        return _IN_PROGRESS.interrupted(event)

    def end_attempt(self, event: Path) -> None:
        """The attempt ends with the event left in the inbox."""
        _IN_PROGRESS.end(event, lambda: None)

    def applied(self, event: Path) -> None:
        def remove() -> None:
            self.attempts_path(event).unlink(missing_ok=True)
            event.unlink()

        _IN_PROGRESS.end(event, remove)

    def set_aside(self, event: Path, error: str) -> None:
        """Move an event that cannot be applied to failed/, beside a file saying why."""

        def move() -> None:
            self.files.failed.mkdir(parents=True, exist_ok=True)
            write_atomically(self.files.failed / f"{event.stem}.error.txt", f"{error}\n".encode())
            event.rename(self.files.failed / event.name)
            self.attempts_path(event).unlink(missing_ok=True)

        _IN_PROGRESS.end(event, move)

    def set_aside_paths(self) -> list[Path]:
        return sorted(self.files.failed.glob("*.json")) if self.files.failed.is_dir() else []

    def set_aside_events(self) -> list[dict]:
        """The events set aside, oldest first: file name, action, annotation (where one) and why."""
        listed = []
        for event in self.set_aside_paths():
            try:
                reason = (self.files.failed / f"{event.stem}.error.txt").read_text().strip()
            except OSError:
                reason = "unknown"
            try:
                body = json.loads(event.read_bytes())
                annotation = (body.get("annotation") or {}).get("id")
                action = body.get("action")
            except (OSError, ValueError, AttributeError):
                annotation, action = None, None
            listed.append({"event": event.name, "action": action, "annotation": annotation, "reason": reason})
        return listed

    def replay_set_aside(self) -> int:
        """Put every set-aside event back in the inbox, where it keeps its place by arrival time, with its attempts
        counted afresh; returns how many. Callers then hand the project's events on as a webhook does."""
        events = self.set_aside_paths()
        for event in events:
            self.files.inbox.mkdir(parents=True, exist_ok=True)
            event.rename(self.files.inbox / event.name)
            (self.files.failed / f"{event.stem}.error.txt").unlink(missing_ok=True)
        return len(events)


@dataclass
class IngestOutcome:
    applied: int = 0
    stored: int = 0  # annotations with masks stored by this round
    training_requested: bool = False
    annotation_count: int = 0  # annotations stored since the last training, after this round


def _saved_annotation(
    event: dict, training_set: TrainingSet, resources: Callable[[], TrainingResources], limits: MaskLimits
) -> bool:
    """Store an annotation's masks; True if it holds any."""
    annotation, task = event.get("annotation") or {}, event.get("task") or {}
    try:
        config = parse_label_config(event["project"].get("label_config") or "")
        record, left_out = record_from_webhook(annotation, task, config, limits)
    except (ConfigError, Rejected) as error:
        training_set.reject(annotation.get("id"), task.get("id"), [("*", str(error))])
        return False
    if record.regions:
        try:
            available = resources()
            features = available.features(training_set.files)
            embedding, record.image_digest = available.embedding_for(features, record.image_url, None)
        except (ImageError, ModelNotReady) as error:
            # The masks are kept; training fetches the image again and checks their size then.
            log.warning(
                "project %d annotation %d stored unchecked: %s",
                training_set.files.project_id,
                record.annotation_id,
                error,
            )
        else:
            image_size = tuple(embedding.original_size)
            for region in list(record.regions):
                if region.shape != image_size:
                    record.regions.remove(region)
                    height, width = region.shape
                    reason = f"mask is {width}x{height} but the image is {image_size[1]}x{image_size[0]}"
                    left_out.append((region.region_id, reason))
    training_set.put(record)
    if left_out:
        training_set.reject(record.annotation_id, record.task_id, left_out)
    return bool(record.regions)


def _apply(
    event: dict,
    training_set: TrainingSet,
    resources: Callable[[], TrainingResources],
    limits: MaskLimits,
    outcome: IngestOutcome,
) -> int:
    """Apply one event; returns how many annotations with masks it stored."""
    action = event.get("action")
    if action in ANNOTATION_SAVED:
        return int(_saved_annotation(event, training_set, resources, limits))
    if action == ANNOTATIONS_DELETED:
        ids = [item.get("id") for item in event.get("annotations") or [] if isinstance(item, dict)]
        dropped = [
            annotation_id
            for annotation_id in ids
            if is_label_studio_id(annotation_id) and training_set.drop(annotation_id)
        ]
        log.info("project %d: dropped annotations %s from the training set", training_set.files.project_id, dropped)
    elif action == START_TRAINING:
        outcome.training_requested = True
    return 0


def apply_pending(files: ProjectFiles, resources: Callable[[], TrainingResources], limits: MaskLimits) -> IngestOutcome:
    """Apply every recorded event of the project, oldest first; safe to run from several processes. `limits` bound
    the masks an event may declare."""
    outcome = IngestOutcome()
    training_set = TrainingSet(files)
    inbox = Inbox(files)
    with file_lock(files.ingest_lock):
        for path in inbox.pending():
            if inbox.begin_attempt(path) > EVENT_ATTEMPTS:
                log.error(
                    "project %d: event %s ended the process in each of %d attempts; set aside in %s",
                    files.project_id,
                    path.name,
                    EVENT_ATTEMPTS,
                    files.failed,
                )
                inbox.set_aside(path, f"the process applying it died in each of {EVENT_ATTEMPTS} attempts")
                continue
            try:
                event = json.loads(path.read_bytes())
                outcome.stored += _apply(event, training_set, resources, limits, outcome)
            except BaseException as error:
                if inbox.interrupted(path) or not isinstance(error, Exception):
                    inbox.end_attempt(path)  # a stop or a job time-out: the event waits in the inbox
                    raise
                # A bug or a full disk must not block the events behind it.
                log.exception(
                    "project %d: event %s could not be applied; kept in %s", files.project_id, path.name, files.failed
                )
                inbox.set_aside(path, f"{type(error).__name__}: {error}")
                continue
            inbox.applied(path)
            outcome.applied += 1
        outcome.annotation_count = read_annotation_count(files) + outcome.stored
        if outcome.stored:
            write_annotation_count(files, outcome.annotation_count)
    return outcome


def last_training(files: ProjectFiles) -> dict | None:
    """The project's last training result, as any process of the deployment wrote it."""
    try:
        return json.loads(files.last_training.read_text())
    except (OSError, ValueError):
        return None
