"""INFERENCE=local's encode-ahead scheduling: which image to encode next before an annotator opens it.

A click names the tasks after its own (`prefetch`: the next PREFETCH_TASKS in the project's imported-task list);
those go first, then, with ENCODE_ON_IMPORT, the project's imported tasks in the list's order. The encoding itself
runs on `BackgroundEncoder`'s one thread, below every request.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from backend.bookkeeping.imports import ImportedTasks
from backend.cache.store import ByteStore
from backend.errors import ImageError
from backend.inference.background import BackgroundEncoder
from backend.inference.loading import Models
from backend.models.loader import BackgroundLoader
from backend.project_files import ProjectFiles

log = logging.getLogger(__name__)


class EncodeAhead:
    """Schedules encoding ahead of the annotator; `encode_url(url, project_id)` caches one image's embedding."""

    def __init__(
        self,
        models: BackgroundLoader[Models],
        store: ByteStore,
        encode_url: Callable[[str, int | None], bool],
        model_dir: str | Path,
        prefetch_tasks: int,
        encode_on_import: bool,
        model_ready_timeout_s: float,
    ) -> None:
        self.models = models
        self.store = store
        self.encode_url = encode_url
        self.model_dir = model_dir
        self.prefetch_tasks = prefetch_tasks
        self.encode_on_import = encode_on_import
        self.model_ready_timeout_s = model_ready_timeout_s
        self.pool = BackgroundEncoder()
        self._prefetch: dict[int, collections.deque[str]] = {}  # per project: images to encode before imported ones
        self._prefetch_mutex = threading.Lock()

    def imported(self, project_id: int) -> ImportedTasks:
        return ImportedTasks(ProjectFiles(self.model_dir, project_id))

    def step(self, project_id: int, prefetched: Callable[[], str | None], imports: bool) -> bool:
        """Encode one image ahead of the annotator: the next one `prefetched` names (the tasks after the one just
        asked for), else, with `imports` (ENCODE_ON_IMPORT), the project's next imported task (`ImportedTasks`);
        False when none is left. An image that cannot be fetched is logged and passed over."""
        models = self.models.get(self.model_ready_timeout_s)  # first: a loading model keeps the task listed
        if not self.store.has_room(models.embeddings.entry_bytes):
            # Encoding ahead must never evict an embedding an annotator is using: stop; the next request resumes.
            log.info("project %d: the cache is near its bound; encoding ahead stops", project_id)
            return False
        image_url = prefetched()
        if image_url is None and not imports:
            return False
        if image_url is None:
            task = self.imported(project_id).take()
            if task is None:
                return False
            image_url = task.image_url
        try:
            self.encode_url(image_url, project_id)
        except ImageError as error:
            log.warning("project %d: image %s not encoded ahead: %s", project_id, image_url, error)
        return True

    def schedule(self, project_id: int) -> None:
        """Encode the project's prefetched and (ENCODE_ON_IMPORT) imported tasks' images in the background, on the
        pool of one."""
        imports = self.encode_on_import
        self.pool.schedule(
            project_id, lambda: self.step(project_id, lambda: self._next_prefetched(project_id), imports)
        )

    def prefetch(self, project_id: int, task_id: int) -> None:
        """Encode the next PREFETCH_TASKS imported tasks after `task_id` before any other waiting import."""
        following = self.imported(project_id).following(task_id, self.prefetch_tasks)
        if not following:
            return
        with self._prefetch_mutex:  # the annotator moved on: the tasks after the newest request replace the others
            self._prefetch[project_id] = collections.deque(task.image_url for task in following)
        self.schedule(project_id)

    def _next_prefetched(self, project_id: int) -> str | None:
        with self._prefetch_mutex:
            waiting = self._prefetch.get(project_id)
            return waiting.popleft() if waiting else None
