"""Webhook events → the project's training set: recorded durably within the webhook's 1 s, applied later.

Label Studio drops a webhook that takes over a second and never resends it, so the handler only writes
the event to the project's inbox (one file, flushed, renamed into place) and returns. A background
thread then applies inbox files in arrival order: decodes the masks, fetches the image to check their
size and cache its embedding, stores or drops the annotation, and removes the file only once its effect
is stored, so a crash replays it (applying is idempotent). An event that fails unexpectedly moves to
failed/ with its error; so does one whose applying killed the process EVENT_ATTEMPTS times (each attempt is
counted on disk before it starts), so that an event that runs the process out of memory cannot make every
restart die again. Regions that cannot be learnt from are logged and listed in rejections.jsonl.
Secrets in the payload's project object (its token, task data password) are not written.
"""

from __future__ import annotations

import json
import logging
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
from backend.training.dataset import TrainingSet, record_from_webhook

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


class Inbox:
    """Recorded events of one project, in arrival order."""

    def __init__(self, files: ProjectFiles) -> None:
        self.files = files

    def record(self, body: dict) -> Path:
        path = self.files.inbox / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        write_atomically(path, json.dumps(stored_event(body)).encode())
        return path

    def pending(self) -> list[Path]:
        return sorted(self.files.inbox.glob("*.json")) if self.files.inbox.is_dir() else []

    @staticmethod
    def _attempts_path(event: Path) -> Path:
        return event.with_suffix(".attempts")

    def begin_attempt(self, event: Path) -> int:
        """Count one more attempt at applying `event`, durably, before it starts; returns the count."""
        try:
            attempts = int(self._attempts_path(event).read_text()) + 1
        except (OSError, ValueError):
            attempts = 1
        write_atomically(self._attempts_path(event), str(attempts).encode())
        return attempts

    def applied(self, event: Path) -> None:
        self._attempts_path(event).unlink(missing_ok=True)
        event.unlink()

    def set_aside(self, event: Path, error: str) -> None:
        """Move an event that cannot be applied to failed/, beside a file saying why."""
        self.files.failed.mkdir(parents=True, exist_ok=True)
        event.rename(self.files.failed / event.name)
        write_atomically(self.files.failed / f"{event.stem}.error.txt", f"{error}\n".encode())
        self._attempts_path(event).unlink(missing_ok=True)


@dataclass
class IngestOutcome:
    applied: int = 0
    stored: int = 0  # annotations with masks stored by this round
    training_requested: bool = False
    annotation_count: int = 0  # annotations stored since the last training, after this round


def _saved_annotation(
    event: dict, training_set: TrainingSet, resources: Callable[[], TrainingResources], max_pixels: int
) -> bool:
    """Store an annotation's masks; True if it holds any."""
    annotation, task = event.get("annotation") or {}, event.get("task") or {}
    try:
        config = parse_label_config(event["project"].get("label_config") or "")
        record, left_out = record_from_webhook(annotation, task, config, max_pixels)
    except (ConfigError, Rejected) as error:
        training_set.reject(annotation.get("id"), task.get("id"), [("*", str(error))])
        return False
    if record.regions:
        try:
            embedding, record.image_digest = resources().embedding_for(record.image_url, None)
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
                if region.mask.shape != image_size:
                    record.regions.remove(region)
                    height, width = region.mask.shape
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
    max_pixels: int,
    outcome: IngestOutcome,
) -> int:
    """Apply one event; returns how many annotations with masks it stored."""
    action = event.get("action")
    if action in ANNOTATION_SAVED:
        return int(_saved_annotation(event, training_set, resources, max_pixels))
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


def apply_pending(files: ProjectFiles, resources: Callable[[], TrainingResources], max_pixels: int) -> IngestOutcome:
    """Apply every recorded event of the project, oldest first; safe to run from several processes.
    `max_pixels` (MAX_IMAGE_PIXELS) bounds the masks an event may declare."""
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
                outcome.stored += _apply(event, training_set, resources, max_pixels, outcome)
            except Exception as error:  # a bug or a full disk must not block the events behind it
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
