"""Which of a project's task images have their embedding in the cache now, for /status.

Whoever caches an image's embedding for a project (encoding an import or a prefetch, a whole-project run, a click
that missed) appends the embedding's cache key, which names the model and the image content, to the project's list
(MODEL_DIR/<project>/encoded-images.jsonl; the queue workers share MODEL_DIR with the web tier). /status then reads
the newest COVERAGE_SAMPLE entries and asks the cache which of those keys it still holds (one EXISTS per thousand),
so its cost is bounded whatever the project's size, and the web tier needs neither the model nor the images. The
newest entry names the model being served: entries of an earlier model are not counted.

A process records a key once (it remembers what it recorded); what several processes record twice is dropped when
the list has doubled since it was last compacted. A project whose list cannot be read reports its error in /status
beside the other projects' counts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from backend.bookkeeping import jsonl
from backend.cache.locks import file_lock
from backend.cache.store import ByteStore
from backend.project_files import ProjectFiles, write_atomically

COVERAGE_SAMPLE = 10_000  # newest entries a project's count reads; beyond, /status says it sampled
ENTRY_BYTES = 160  # at most, of one entry: {"key": "sam:emb:<model>-<16 hex>:<64 hex>"}
COVERAGE_FILE = "encoded-images.jsonl"
COMPACT_MIN_BYTES = 64 * 1024  # a list is compacted once past twice its size after the last compaction, and this
REMEMBERED_KEYS = 100_000  # keys a process remembers having recorded, over all projects, before it starts afresh

log = logging.getLogger(__name__)


class EncodedImages:
    """One project's list of the embedding keys cached for its images."""

    def __init__(self, files: ProjectFiles) -> None:
        self.path = files.root / COVERAGE_FILE
        self.lock_path = files.root / ".encoded-images.lock"
        self.compacted_path = files.root / ".encoded-images.compacted"  # the list's size after its last compaction

    def record(self, embedding_key: str) -> None:
        line = json.dumps({"key": embedding_key}).encode() + b"\n"
        with file_lock(self.lock_path):
            jsonl.append(self.path, line)
            if self.path.stat().st_size > max(2 * self._compacted_bytes(), COMPACT_MIN_BYTES):
                self._compact()

    def _compacted_bytes(self) -> int:
        try:
            return int(self.compacted_path.read_text())
        except (OSError, ValueError):
            return 0

    def _compact(self) -> None:
        """Rewrite the list with each key once, where it was last recorded. The caller holds the lock."""
        with open(self.path, "rb") as handle:
            keys = [key for line in handle if isinstance(key := (jsonl.entry(line) or {}).get("key"), str)]
        newest_last = reversed(dict.fromkeys(reversed(keys)))
        data = b"".join(json.dumps({"key": key}).encode() + b"\n" for key in newest_last)
        write_atomically(self.path, data)
        write_atomically(self.compacted_path, str(len(data)).encode())

    def newest_keys(self, count: int) -> tuple[list[str], bool]:
        """The keys of the last `count` entries (fewer when entries repeat), newest first, and whether older
        entries were left unread."""
        try:
            with open(self.path, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                start = max(size - count * ENTRY_BYTES, 0)
                handle.seek(start)
                tail = handle.read()
        except FileNotFoundError:
            return [], False
        lines = tail.split(b"\n")[:-1]  # the text after the last newline is an entry being written
        if start > 0:
            lines = lines[1:]  # starts mid-entry
        newest = lines[-count:]
        read = (jsonl.entry(line) or {} for line in reversed(newest))
        keys = list(dict.fromkeys(key for entry in read if isinstance(key := entry.get("key"), str)))
        return keys, start > 0 or len(lines) > len(newest)

    def coverage(self, store: ByteStore, sample: int = COVERAGE_SAMPLE) -> dict[str, object]:
        """How many of the newest `sample` recorded images of the served model have their embedding cached now."""
        keys, sampled = self.newest_keys(sample)
        if not keys:
            return {"images": 0, "encoded_now": 0}
        model = keys[0].rsplit(":", 1)[0]  # sam:emb:<model identity>
        served = [key for key in keys if key.rsplit(":", 1)[0] == model]
        answer: dict[str, object] = {"images": len(served), "encoded_now": store.count_present(served)}
        if sampled:
            answer["sampled"] = f"the newest {sample} entries"
        return answer


def project_coverage(model_dir: str | Path, store: ByteStore) -> dict[str, dict[str, object]]:
    """Per project with recorded images, its coverage (`EncodedImages.coverage`), or why it could not be read."""
    answer: dict[str, dict[str, object]] = {}
    for project_id in ProjectFiles.projects(model_dir):
        encoded = EncodedImages(ProjectFiles(model_dir, project_id))
        if not encoded.path.exists():
            continue
        try:
            answer[str(project_id)] = encoded.coverage(store)
        except Exception as error:  # one project's unreadable list must not hide the others'
            log.exception("project %d: its coverage list %s cannot be read", project_id, encoded.path)
            answer[str(project_id)] = {"error": f"{COVERAGE_FILE} cannot be read: {type(error).__name__}"}
    return answer


class CoverageRecorder:
    """Where the processes that cache embeddings record them, per project (`EncodedImages`), each key once."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = model_dir
        self._recorded: set[tuple[int, str]] = set()
        self._mutex = threading.Lock()

    def record(self, project_id: int, embedding_key: str) -> None:
        with self._mutex:
            if (project_id, embedding_key) in self._recorded:
                return
        EncodedImages(ProjectFiles(self.model_dir, project_id)).record(embedding_key)
        with self._mutex:
            if len(self._recorded) >= REMEMBERED_KEYS:
                self._recorded.clear()
            self._recorded.add((project_id, embedding_key))
