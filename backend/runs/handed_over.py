"""The tasks of a project that a "Retrieve predictions" batch could not finish within PREDICT_DEADLINE and handed
to the project's background run: MODEL_DIR/<project>/handed-over.json for pre-annotation (each task's id to its data
as Label Studio sent it: the run needs the image URL) and handed-over-videos.json for video tracking (each video
task's id to its data, annotations and drafts: the run needs the keyframes too). Looking a task up through Label
Studio's task API instead would make Label Studio ask this backend for the task's prediction itself, one task at a
time.

A task leaves the list once the run has stored its prediction, found it predicted meanwhile, or recorded its error;
the list outlives the process, so a restarted backend resumes the run where it stopped. Every process of the host
changes it under one file lock and replaces it whole, so a reader never sees half of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from backend.project_files import write_atomically

log = logging.getLogger(__name__)


class HandedOverTasks:
    def __init__(self, path: Path) -> None:
        self.path = path  # a ProjectFiles path: `handed_over`, or `handed_over_videos` for video tracking runs
        self.lock_path = path.with_name(f".{path.stem}.lock")

    def tasks(self) -> dict[int, dict]:
        """The tasks waiting, by id in ascending order, each with its data; none when the file is missing or
        unreadable (logged)."""
        try:
            waiting = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.warning("%s is unreadable, its tasks are no longer handed over: %s", self.path, error)
            return {}
        if not isinstance(waiting, dict):
            return {}
        found = {int(key): data for key, data in waiting.items() if key.isdigit() and isinstance(data, dict)}
        return dict(sorted(found.items()))

    def ids(self) -> list[int]:
        return list(self.tasks())

    def add(self, tasks: dict[int, dict]) -> None:
        with self._locked():
            self._write({**self.tasks(), **tasks})

    def discard(self, task_ids: Iterable[int]) -> None:
        gone = set(task_ids)
        if not gone:
            return
        with self._locked():
            waiting = self.tasks()
            if gone & waiting.keys():
                self._write({task_id: data for task_id, data in waiting.items() if task_id not in gone})

    def _write(self, tasks: dict[int, dict]) -> None:
        if tasks:
            write_atomically(self.path, json.dumps({str(task_id): data for task_id, data in tasks.items()}).encode())
        else:
            self.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
