"""Which of a project's task images have their embedding in the cache now, for /status.

Whoever caches an image's embedding for a project (encoding an import or a prefetch, a whole-project run, a click
that missed) appends the embedding's cache key, which names the model and the image content, to the project's list
(MODEL_DIR/<project>/encoded-images.jsonl; the queue workers share MODEL_DIR with the web tier). /status then reads
the newest COVERAGE_SAMPLE entries and asks the cache which of those keys it still holds (one EXISTS per thousand),
so its cost is bounded whatever the project's size, and the web tier needs neither the model nor the images. The
newest entry names the model being served: entries of an earlier model are not counted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from backend.cache.locks import file_lock
from backend.cache.store import ByteStore
from backend.project_files import ProjectFiles

COVERAGE_SAMPLE = 10_000  # newest entries a project's count reads; beyond, /status says it sampled
ENTRY_BYTES = 160  # at most, of one entry: {"key": "sam:emb:<model>-<16 hex>:<64 hex>"}
COVERAGE_FILE = "encoded-images.jsonl"


class EncodedImages:
    """One project's list of the embedding keys cached for its images."""

    def __init__(self, files: ProjectFiles) -> None:
        self.path = files.root / COVERAGE_FILE
        self.lock_path = files.root / ".encoded-images.lock"

    def record(self, embedding_key: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.lock_path), open(self.path, "ab") as handle:
            handle.write(json.dumps({"key": embedding_key}).encode() + b"\n")

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
        keys = list(dict.fromkeys(json.loads(line)["key"] for line in reversed(newest)))
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
    """Per project with recorded images, its coverage (`EncodedImages.coverage`)."""
    return {
        str(project_id): encoded.coverage(store)
        for project_id in ProjectFiles.projects(model_dir)
        if (encoded := EncodedImages(ProjectFiles(model_dir, project_id))).path.exists()
    }


class CoverageRecorder:
    """Where the processes that cache embeddings record them, per project (`EncodedImages`)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = model_dir

    def record(self, project_id: int, embedding_key: str) -> None:
        EncodedImages(ProjectFiles(self.model_dir, project_id)).record(embedding_key)
