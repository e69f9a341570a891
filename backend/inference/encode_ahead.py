"""INFERENCE=local's encode-ahead scheduling, also run by queue workers: which image to encode next, before an
annotator opens it, and what it may push out of a full cache.

A click names the tasks after its own (`prefetch`: the next PREFETCH_TASKS in the project's imported-task list);
those go first, then, with ENCODE_ON_IMPORT, the project's imported tasks in the list's order.

A cache bounded by LRU sits at its bound for good once it has filled, so the bound cannot be where encoding ahead
stops. What may be evicted is what annotators have left behind: the least recently used images. The prefetched
images (the next tasks of an annotator) are worth more than those, so they are encoded whatever the cache's fill,
evicting the oldest; the clicked image and the ones just prefetched were used last, so they are the last an LRU
evicts (docs/scaling.md says how much room that takes per annotator). The rest of an import is worth no more than
the images already encoded ahead of the annotators, so it is encoded only below the bound's ROOM_FRACTION; at the
bound that step answers `Step.AT_BOUND` at once (logged once per project until it is below again), and the next
request's prefetch goes on from where the annotator is: nothing spins.

An image already cached is recognised without a download when its URL was fetched before (`ImageDigests`): it is
only marked used (so it stays), and recorded as the project's if this process has not recorded it.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from backend.bookkeeping.coverage import CoverageRecorder
from backend.bookkeeping.imports import ImportedTasks
from backend.cache.digests import ImageDigests
from backend.cache.store import ByteStore
from backend.errors import ImageError
from backend.images import redact_url
from backend.inference.background import BackgroundEncoder
from backend.inference.loading import Models
from backend.models.loader import BackgroundLoader
from backend.project_files import ProjectFiles

log = logging.getLogger(__name__)


class Step(enum.Enum):
    ENCODED = "encoded"  # one image encoded or found cached: ask again
    DONE = "done"  # nothing is left to encode ahead
    AT_BOUND = "at bound"  # imported tasks are left, but the cache is at its bound: the next prefetch goes on


class EncodeAhead:
    """Schedules encoding ahead of the annotator; `encode_url(url, project_id)` caches one image's embedding."""

    def __init__(
        self,
        models: BackgroundLoader[Models],
        store: ByteStore,
        digests: ImageDigests,
        coverage: CoverageRecorder,
        encode_url: Callable[[str, int | None], bool],
        model_dir: str | Path,
        prefetch_tasks: int,
        encode_on_import: bool,
        model_ready_timeout_s: float,
    ) -> None:
        self.models = models
        self.store = store
        self.digests = digests
        self.coverage = coverage
        self.encode_url = encode_url
        self.model_dir = model_dir
        self.prefetch_tasks = prefetch_tasks
        self.encode_on_import = encode_on_import
        self.model_ready_timeout_s = model_ready_timeout_s
        self.pool = BackgroundEncoder()
        self._prefetch: dict[int, collections.deque[str]] = {}  # per project: images to encode before imported ones
        self._prefetch_mutex = threading.Lock()
        self._at_bound: set[int] = set()  # projects whose imports wait for room (logged once)

    def imported(self, project_id: int) -> ImportedTasks:
        return ImportedTasks(ProjectFiles(self.model_dir, project_id))

    def step(self, project_id: int, prefetched: Callable[[], str | None], imports: bool) -> Step:
        """Encode one image ahead of the annotator: the next one `prefetched` names (the tasks after the one just
        asked for), else, with `imports` (ENCODE_ON_IMPORT) and room below the cache's bound, the project's next
        imported task (`ImportedTasks`). An image that cannot be fetched is logged and passed over."""
        models = self.models.get(self.model_ready_timeout_s)  # first: a loading model keeps the task listed
        image_url = prefetched()
        if image_url is None:
            if not imports:
                return Step.DONE
            if not self.store.has_room(models.embeddings.entry_bytes):
                self._note_bound(project_id, reached=True)
                return Step.AT_BOUND
            task = self.imported(project_id).take()
            if task is None:
                return Step.DONE
            self._note_bound(project_id, reached=False)
            image_url = task.image_url
        self._encode(models, project_id, image_url)
        return Step.ENCODED

    def _encode(self, models: Models, project_id: int, image_url: str) -> None:
        digest = self.digests.digest(image_url)
        if digest is not None and self.store.touch(key := models.embeddings.key(digest)):
            self.coverage.record(project_id, key)  # cached for another project, perhaps
            return
        try:
            self.encode_url(image_url, project_id)
        except ImageError as error:
            log.warning("project %d: image %s not encoded ahead: %s", project_id, redact_url(image_url), error)

    def _note_bound(self, project_id: int, reached: bool) -> None:
        with self._prefetch_mutex:
            if reached == (project_id in self._at_bound):
                return
            (self._at_bound.add if reached else self._at_bound.discard)(project_id)
        if reached:
            log.info(
                "project %d: the cache is at its bound; its imported tasks wait, and only the tasks after the one an "
                "annotator opens are encoded ahead, evicting the least recently used",
                project_id,
            )
        else:
            log.info("project %d: the cache has room again; its imported tasks are encoded ahead", project_id)

    def schedule(self, project_id: int) -> None:
        """Encode the project's prefetched and (ENCODE_ON_IMPORT) imported tasks' images in the background, on the
        pool of one."""
        imports = self.encode_on_import

        def one_step() -> bool:
            return self.step(project_id, lambda: self._next_prefetched(project_id), imports) is Step.ENCODED

        self.pool.schedule(project_id, one_step)

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
