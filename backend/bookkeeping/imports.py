"""Tasks Label Studio imported (the TASKS_CREATED webhook), recorded durably for their images to be encoded later.

Label Studio gives a webhook one second and never resends it, so the handler only appends each new task's id and
image URL to the project's list (MODEL_DIR/<project>/imported-tasks.jsonl, flushed to disk) and returns. Encoding
then takes the tasks from the list one at a time (`ImportedTasks.take`), advancing a cursor stored beside it, so an
import of 100,000 tasks is one file on disk and never 100,000 jobs in memory or Redis. The cursor moves before the
image is encoded: a process killed mid-encode leaves that one image to the first click (or `encode --project`).

The list is kept in ascending id order, Label Studio's default order for an annotator, so that the tasks after a
task are found by a binary search (`following`). Webhooks handled side by side on several workers can arrive out of
order, and Label Studio may send one twice: such an append merges the list instead (sorted, one entry per task,
the entries already taken marked so), which also compacts it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from backend.bookkeeping import jsonl
from backend.cache.locks import file_lock
from backend.errors import ConfigError, WebhookError
from backend.project_files import ProjectFiles, write_atomically
from backend.protocol.ids import is_label_studio_id
from backend.protocol.label_config import parse_label_config

log = logging.getLogger(__name__)

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
        """Add tasks to the list: appended when they come after every task listed, else merged into it."""
        if not tasks:
            return
        ids = [task.id for task in tasks]
        with file_lock(self.lock_path):
            size = jsonl.repaired(self.path)
            last = _last_entry(self.path, size)
            if all(earlier < later for earlier, later in zip(ids, ids[1:], strict=False)) and (
                last is None or last.id < ids[0]
            ):
                jsonl.append(self.path, b"".join(_line(task) for task in tasks))
            else:
                self._merge(tasks)

    def _merge(self, tasks: list[ImportedTask]) -> None:
        """Rewrite the list in ascending id order with one entry per task (the newest image URL), the tasks already
        taken marked so; the cursor moves to the first task not taken. The caller holds the lock."""
        cursor = self._cursor()
        merged: dict[int, tuple[ImportedTask, bool]] = {}
        try:
            with open(self.path, "rb") as handle:
                offset = 0
                for line in handle:
                    listed = _parsed(line) if line.endswith(b"\n") else None
                    if listed is not None:
                        entry, taken = listed
                        was_taken = entry.id in merged and merged[entry.id][1]
                        merged[entry.id] = (entry, taken or offset < cursor or was_taken)
                    offset += len(line)
        except FileNotFoundError:
            pass
        for task in tasks:
            merged[task.id] = (task, task.id in merged and merged[task.id][1])
        ordered = [merged[task_id] for task_id in sorted(merged)]
        lines = [_line(entry, taken) for entry, taken in ordered]
        first_pending = next((index for index, (_, taken) in enumerate(ordered) if not taken), len(ordered))
        # The cursor goes back to the start first: killed between the two writes, encoding walks the list again
        # (its images are cached: no encode) rather than reading from the middle of a line.
        write_atomically(self.cursor_path, b"0")
        write_atomically(self.path, b"".join(lines))
        write_atomically(self.cursor_path, str(sum(map(len, lines[:first_pending]))).encode())
        log.info("project %d: imported-task list merged (%d tasks)", self.files.project_id, len(lines))

    def _cursor(self) -> int:
        try:
            return int(self.cursor_path.read_text())
        except (OSError, ValueError):
            return 0

    def take(self) -> ImportedTask | None:
        """The next task not yet taken, or None when encoding has caught up with the imports."""
        with file_lock(self.lock_path):
            # Appends hold the lock: an unfinished last line is torn, not being written. Cut off now, or `pending`
            # counts it as a task left and the encoding job asks again for ever (until the next import repairs it).
            jsonl.repaired(self.path)
            cursor = self._cursor()
            try:
                with open(self.path, "rb") as handle:
                    handle.seek(cursor)
                    while True:
                        line = handle.readline()
                        if not line.endswith(b"\n"):
                            return None  # nothing more
                        cursor += len(line)
                        listed = _parsed(line)
                        if listed is not None and not listed[1]:
                            break
            except FileNotFoundError:
                return None
            write_atomically(self.cursor_path, str(cursor).encode())
        return listed[0]

    def following(self, task_id: int, count: int) -> list[ImportedTask]:
        """The `count` tasks listed after task `task_id` in ascending id order, which is Label Studio's default order
        for an annotator (sequential sampling) and the list's own (`append` keeps it so). A binary search over the
        file: a few reads whatever the import's size."""
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
    """The first readable complete line starting at `offset` or after it (None past the last), leaving `handle`
    after it."""
    handle.seek(max(offset - 1, 0))
    if offset > 0 and handle.read(1) != b"\n":
        handle.readline()  # the middle of a line: it belongs to the line before
    while (line := handle.readline()).endswith(b"\n"):
        listed = _parsed(line)
        if listed is not None:
            return listed[0]
    return None


def _last_entry(path: Path, size: int) -> ImportedTask | None:
    """The list's last readable entry (its lines end before `size`)."""
    try:
        with open(path, "rb") as handle:
            start = size
            while start > 0:  # back a block at a time until a whole readable line is in view
                start = max(start - 4096, 0)
                handle.seek(start)
                lines = handle.read(size - start).split(b"\n")[:-1]
                if start > 0:
                    lines = lines[1:]  # starts mid-line
                for line in reversed(lines):
                    listed = _parsed(line + b"\n")
                    if listed is not None:
                        return listed[0]
    except FileNotFoundError:
        pass
    return None


def _line(task: ImportedTask, taken: bool = False) -> bytes:
    return (json.dumps({"id": task.id, "image": task.image_url, **({"taken": True} if taken else {})}) + "\n").encode()


def _parsed(line: bytes) -> tuple[ImportedTask, bool] | None:
    """A line's task and whether a merge marked it taken; None for a line that lists none."""
    entry = jsonl.entry(line)
    if entry is None or not isinstance(entry.get("id"), int) or not isinstance(entry.get("image"), str):
        return None
    return ImportedTask(entry["id"], entry["image"]), bool(entry.get("taken"))


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
