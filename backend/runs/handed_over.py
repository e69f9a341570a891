"""The tasks of a project that a "Retrieve predictions" batch could not finish within PREDICT_DEADLINE and handed
to the project's background pre-annotation run: MODEL_DIR/<project>/handed-over.json, a JSON list of task ids.

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

from backend.project_files import ProjectFiles, write_atomically

log = logging.getLogger(__name__)


class HandedOverTasks:
    def __init__(self, files: ProjectFiles) -> None:
        self.path = files.handed_over
        self.lock_path = files.root / ".handed-over.lock"

    def ids(self) -> list[int]:
        """The task ids waiting, in ascending order; none when the file is missing or unreadable (logged)."""
        try:
            ids = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as error:
            log.warning("%s is unreadable, its tasks are no longer handed over: %s", self.path, error)
            return []
        return sorted({task_id for task_id in ids if isinstance(task_id, int)}) if isinstance(ids, list) else []

    def add(self, task_ids: Iterable[int]) -> None:
        with self._locked():
            self._write(set(self.ids()) | set(task_ids))

    def discard(self, task_ids: Iterable[int]) -> None:
        gone = set(task_ids)
        if not gone:
            return
        with self._locked():
            waiting = set(self.ids())
            if waiting & gone:
                self._write(waiting - gone)

    def _write(self, task_ids: set[int]) -> None:
        if task_ids:
            write_atomically(self.path, json.dumps(sorted(task_ids)).encode())
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
