"""The image features a project's trainings read, kept on disk beside its training set, apart from the LRU cache.

An annotation's image is encoded when the annotator clicks it: its embedding is stored here then (in a project that
learns, with a segmenter that fine-tunes), and else when the annotation's webhook is applied; one file per image,
under the encoder's identity. A training reads its images from here instead of the embedding cache, which in a
project larger than the cache has long evicted most of them: re-encoding them took a worker minutes per training on
a large project and pushed out of the cache the images encoded ahead of the annotators. Files are the cache's own
serialisation (`serialize_embedding`), written atomically but not flushed to the disk (a click waits on the write);
a torn or foreign file reads as absent and is replaced. The store is bounded by `TRAIN_FEATURES_MAX_MB` per project
(an image over it is encoded again by each training), and each training removes the files of the images no
annotation refers to (clicked and never annotated, or no longer annotated). The store only saves work: a full disk
or an unwritable file is logged and the image encoded again, and no click or annotation waits on it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from backend.cache.embeddings import deserialize_embedding, serialize_embedding
from backend.models.base import ImageEmbedding
from backend.project_files import ProjectFiles, write_atomically

log = logging.getLogger(__name__)

SUFFIX = ".emb"
TEMPORARY_SUFFIX = ".tmp"  # write_atomically's, left behind only by a killed writer


class TrainingFeatures:
    """One project's stored embeddings for one encoder: `get`, `put`, and `keep_only` the images still annotated."""

    def __init__(self, files: ProjectFiles, encoder_identity: str, max_bytes: int) -> None:
        # The encoder's identity names a folder, so that another model's features are never read as this one's.
        encoder = hashlib.sha256(encoder_identity.encode()).hexdigest()[:16]
        self.folder = files.features / encoder
        self.project_id = files.project_id
        self.max_bytes = max_bytes

    def _path(self, image_digest: str) -> Path:
        if not image_digest.isalnum():
            raise ValueError(f"not an image digest: {image_digest!r}")
        return self.folder / f"{image_digest}{SUFFIX}"

    def get(self, image_digest: str) -> ImageEmbedding | None:
        """The image's stored features; None when absent or unreadable (then removed, to be stored again)."""
        path = self._path(image_digest)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return deserialize_embedding(data)
        except (ValueError, KeyError, TypeError) as error:
            log.warning(
                "project %d: stored features of image %s unreadable, encoded again: %s",
                self.project_id,
                image_digest,
                error,
            )
            path.unlink(missing_ok=True)
            return None

    def put(self, image_digest: str, embedding: ImageEmbedding) -> bool:
        """Store the image's features unless stored already; False when the store is at its bound."""
        path = self._path(image_digest)
        if path.exists():
            return True
        data = serialize_embedding(embedding)
        stored = self.stored_bytes()
        if stored + len(data) > self.max_bytes:
            log.warning(
                "project %d: features of image %s not stored for training: the store holds %d of its %d MB "
                "(TRAIN_FEATURES_MAX_MB); each training encodes that image again",
                self.project_id,
                image_digest,
                stored // 2**20,
                self.max_bytes // 2**20,
            )
            return False
        try:
            write_atomically(path, data, durable=False)
        except OSError as error:
            log.warning(
                "project %d: features of image %s not stored for training: %s", self.project_id, image_digest, error
            )
            return False
        return True

    def stored_bytes(self) -> int:
        return sum(size for _, size, _ in self._files(SUFFIX))

    def keep_only(self, image_digests: Iterable[str], written_before: float) -> int:
        """Remove the features of every image not in `image_digests`, and killed writers' temporary files, among
        those written before `written_before` (a time.time()): a file written since then is a new annotation's,
        which the training that calls this has not read. Returns how many features were removed."""
        kept = {f"{digest}{SUFFIX}" for digest in image_digests}
        removed = 0
        for path, _, modified in self._files(SUFFIX):
            if path.name not in kept and modified < written_before:
                path.unlink(missing_ok=True)
                removed += 1
        for path, _, modified in self._files(TEMPORARY_SUFFIX):
            if modified < written_before:
                path.unlink(missing_ok=True)
        return removed

    def _files(self, suffix: str) -> list[tuple[Path, int, float]]:
        """(path, size, modification time) of the folder's files named `*suffix`; one removed meanwhile is left out."""
        found = []
        try:
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    if not entry.name.endswith(suffix):
                        continue
                    try:
                        status = entry.stat()
                    except FileNotFoundError:
                        continue
                    found.append((Path(entry.path), status.st_size, status.st_mtime))
        except (FileNotFoundError, NotADirectoryError):
            pass
        return found
