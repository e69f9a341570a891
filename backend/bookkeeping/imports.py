"""Tasks Label Studio imported (the TASKS_CREATED webhook), recorded durably for their images to be encoded later.

Label Studio gives a webhook one second and never resends it, so the handler only appends each new task's id and
image URL to the project's list (MODEL_DIR/<project>/imported-tasks.jsonl, flushed to disk) and returns. Encoding
then takes the tasks from the list one at a time (`ImportedTasks.take`), advancing a cursor stored beside it, so an
import of 100,000 tasks is one file on disk and never 100,000 jobs in memory or Redis. The cursor moves before the
image is encoded: a process killed mid-encode leaves that one image to the first click (or `encode --project`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import BinaryIO

from backend.cache.locks import file_lock
from backend.errors import ConfigError, WebhookError
from backend.project_files import ProjectFiles, write_atomically
from backend.protocol.ids import is_label_studio_id
from backend.protocol.label_config import parse_label_config

TASKS_CREATED = "TASKS_CREATED"
DEFAULT_IMAGE_FIELD = "image"  # the task data key when the payload's label config names none


@dataclass(frozen=True)
class ImportedTask:
    id: int
    image_url: str


class ImportedTasks:
    """One project's list of imported tasks and how far encoding has taken it; safe across threads and processes."""

    def __init__(self, files: ProjectFiles) -> None:
        self.files = files
        self.path = files.root / "imported-tasks.jsonl"
        self.cursor_path = files.root / "imported-tasks.cursor"
        self.lock_path = files.root / ".imported-tasks.lock"

    def append(self, tasks: list[ImportedTask]) -> None:
        lines = "".join(json.dumps({"id": task.id, "image": task.image_url}) + "\n" for task in tasks).encode()
        self.files.root.mkdir(parents=True, exist_ok=True)
        with file_lock(self.lock_path), open(self.path, "ab") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())

    def _cursor(self) -> int:
        try:
            return int(self.cursor_path.read_text())
        except (OSError, ValueError):
            return 0

    def take(self) -> ImportedTask | None:
        """The next task not yet taken, or None when encoding has caught up with the imports."""
        with file_lock(self.lock_path):
            cursor = self._cursor()
            try:
                with open(self.path, "rb") as handle:
                    handle.seek(cursor)
                    line = handle.readline()
            except FileNotFoundError:
                return None
            if not line.endswith(b"\n"):
                return None  # nothing more (or a line being appended)
            write_atomically(self.cursor_path, str(cursor + len(line)).encode())
        return _parsed(line)

    def following(self, task_id: int, count: int) -> list[ImportedTask]:
        """The `count` tasks listed after task `task_id` in ascending id order, which is Label Studio's default order
        for an annotator (sequential sampling) and the list's own: Label Studio numbers tasks as it imports them. A
        binary search over the file: a few reads whatever the import's size."""
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 (closed below; opened here to answer [] when missing)
        except FileNotFoundError:
            return []
        with handle:
            low, high = 0, handle.seek(0, os.SEEK_END)
            while low < high:  # the first byte whose line (the first line starting there or after) lists a later task
                middle = (low + high) // 2
                entry = _line_from(handle, middle)
                if entry is not None and entry.id <= task_id:
                    low = middle + 1
                else:
                    high = middle
            following: list[ImportedTask] = []
            entry = _line_from(handle, low)
            while entry is not None and len(following) < count:
                following.append(entry)
                entry = _line_from(handle, handle.tell())
            return following

    def pending(self) -> bool:
        try:
            return self.path.stat().st_size > self._cursor()
        except FileNotFoundError:
            return False

    def stored_bytes(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


def _line_from(handle: BinaryIO, offset: int) -> ImportedTask | None:
    """The first complete line starting at `offset` or after it (None past the last), leaving `handle` after it."""
    handle.seek(max(offset - 1, 0))
    if offset > 0 and handle.read(1) != b"\n":
        handle.readline()  # the middle of a line: it belongs to the line before
    line = handle.readline()
    return _parsed(line) if line.endswith(b"\n") else None


def _parsed(line: bytes) -> ImportedTask:
    entry = json.loads(line)
    return ImportedTask(entry["id"], entry["image"])


def _image_field(project: dict) -> str:
    try:
        return parse_label_config(project.get("label_config") or "").image_field
    except ConfigError:
        return DEFAULT_IMAGE_FIELD


def record_tasks_created(body: dict, model_dir: str) -> int:
    """Append a TASKS_CREATED webhook's tasks to their project's list; returns the project id. Only cheap checks
    run here, within the webhook's second; a task without an image URL is left out."""
    project = body.get("project")
    project_id = project.get("id") if isinstance(project, dict) else None
    if not isinstance(project, dict) or not is_label_studio_id(project_id):
        raise WebhookError(f"{TASKS_CREATED} webhook without a valid project.id")
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise WebhookError(f"{TASKS_CREATED} webhook needs a 'tasks' list")
    field = _image_field(project)
    imported = [
        ImportedTask(task["id"], task["data"][field])
        for task in tasks
        if isinstance(task, dict)
        and is_label_studio_id(task.get("id"))
        and isinstance(task.get("data"), dict)
        and isinstance(task["data"].get(field), str)
    ]
    ImportedTasks(ProjectFiles(model_dir, project_id)).append(imported)
    return project_id
