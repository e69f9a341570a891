"""Crash-safe file primitives for everything active learning keeps under MODEL_DIR.

A file is written beside its final name, flushed to disk, then renamed over it: a reader sees the old
content or the new, never half of it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Make a rename or creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, durable: bool = True) -> None:
    """Write `path` whole or not at all. Without `durable` nothing is flushed to the disk: for files that only save
    work (a torn one after a power loss reads as absent), written where a click waits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    if durable:
        fsync_directory(path.parent)


IDENTITY_FILE = ".identity"
EVALUATION_PREFIX = "evaluation-"  # a report's files: evaluation-<UTC time>.json, .md, .png (training.report)
RUN_LOCKS = ".run-locks"  # MODEL_DIR's folder of the project runs' lock files


def model_dir_identity(model_dir: str | Path) -> str:
    """A random id written into MODEL_DIR once, by which processes on different machines tell whether they
    see the same folder."""
    path = Path(model_dir) / IDENTITY_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    written = path.with_name(f"{IDENTITY_FILE}.{uuid.uuid4().hex[:8]}.tmp")
    write_atomically(written, uuid.uuid4().hex.encode())
    try:
        os.link(written, path)  # complete or absent, and never replaces one another process wrote first
    except FileExistsError:
        pass
    finally:
        written.unlink()
    return path.read_text().strip()


class ProjectFiles:
    """Where one project's active-learning state lives: MODEL_DIR/<project id>/..."""

    def __init__(self, model_dir: str | Path, project_id: int) -> None:
        self.project_id = project_id
        self.root = Path(model_dir) / str(project_id)
        self.inbox = self.root / "inbox"  # webhook events recorded, not yet applied
        self.failed = self.root / "failed"  # events that could not be applied, kept with the error
        self.annotations = self.root / "annotations"  # the training set, one file per annotation
        self.features = self.root / "features"  # the annotated images' embeddings, per encoder (training.features)
        self.rejections = self.root / "rejections.jsonl"  # why regions were not taken
        self.state = self.root / "state.json"  # annotations since the last training
        self.last_training = self.root / "last_training.json"  # the last training's result
        self.versions = self.root / "versions"
        self.reports = self.root / "reports"  # `python -m backend evaluate`'s reports
        self.ingest_lock = self.root / ".ingest.lock"
        self.train_lock = self.root / ".train.lock"
        # A project run's locks lie outside the project's folder: a run of a project Label Studio does not have
        # fails, and must leave no folder that would pass for the project's.
        self.preannotate_lock = Path(model_dir) / RUN_LOCKS / f"{project_id}.preannotate.lock"
        self.encode_lock = Path(model_dir) / RUN_LOCKS / f"{project_id}.encode.lock"
        self.preannotate_errors = self.root / "preannotate-errors.jsonl"  # tasks a project run could not predict
        self.handed_over = self.root / "handed-over.json"  # tasks a /predict batch left to the project run
        self.track_lock = Path(model_dir) / RUN_LOCKS / f"{project_id}.track.lock"
        self.track_errors = self.root / "track-errors.jsonl"  # video tasks a tracking run could not track
        self.handed_over_videos = self.root / "handed-over-videos.json"  # video tasks left to the tracking run

    def latest_evaluation(self) -> Path | None:
        """The newest evaluation report's JSON; its name's UTC time sorts as the time does."""
        reports = sorted(self.reports.glob(f"{EVALUATION_PREFIX}*.json"))
        return reports[-1] if reports else None

    @staticmethod
    def projects(model_dir: str | Path) -> list[int]:
        root = Path(model_dir)
        if not root.is_dir():
            return []
        return sorted(int(entry.name) for entry in root.iterdir() if entry.is_dir() and entry.name.isdigit())
