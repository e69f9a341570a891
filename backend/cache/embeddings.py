"""SAM image embeddings cached by image content and model identity, encoded once per image.

Value layout: a JSON header line (sizes, shapes) followed by the features, then each extra array the model's
decoder needs (SAM 2's high-resolution maps, SAM-HQ's early ViT features), as raw float16: about 2 MiB for
SAM's 256x64x64 embedding (docs/models.md lists every model's). Every decode, cached or fresh, uses the float16
values, so a click gives the same mask whether the image was just encoded or encoded a day ago elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from backend.cache.store import ByteStore
from backend.models.base import ImageEmbedding, Segmenter

log = logging.getLogger(__name__)

_LOCK_STRIPES = 64
# A SAM ViT embedding's entry (float16 256x64x64 and its header): what an entry is assumed to take until one of the
# served model's is stored or read (SAM 2's and SAM-HQ's, with their extras, are several times larger).
VIT_ENTRY_BYTES = 2 * 256 * 64 * 64 + 1024

EncodeStep = Callable[[int], contextlib.AbstractContextManager[object]]


def no_step(images: int) -> contextlib.AbstractContextManager[object]:
    return contextlib.nullcontext()


def serialize_embedding(embedding: ImageEmbedding) -> bytes:
    features = np.ascontiguousarray(embedding.features, dtype=np.float16)
    extras = {name: np.ascontiguousarray(array, dtype=np.float16) for name, array in embedding.extras.items()}
    header = {
        "shape": list(features.shape),
        "original_size": list(embedding.original_size),
        "input_size": list(embedding.input_size),
        "extras": [[name, list(array.shape)] for name, array in extras.items()],
    }
    return b"".join([json.dumps(header).encode(), b"\n", features.tobytes(), *(a.tobytes() for a in extras.values())])


def deserialize_embedding(data: bytes) -> ImageEmbedding:
    header_bytes, _, payload = data.partition(b"\n")
    header = json.loads(header_bytes)
    values = np.frombuffer(payload, dtype=np.float16)
    arrays = []
    start = 0
    for shape in [header["shape"], *(shape for _, shape in header.get("extras", []))]:
        size = int(np.prod(shape))
        arrays.append(values[start : start + size].reshape(shape))
        start += size
    return ImageEmbedding(
        features=arrays[0],
        original_size=tuple(header["original_size"]),
        input_size=tuple(header["input_size"]),
        extras={name: array for (name, _), array in zip(header.get("extras", []), arrays[1:], strict=True)},
    )


@dataclass
class CachedEmbedding:
    embedding: ImageEmbedding
    cache_hit: bool
    encode_seconds: float = 0.0


class EmbeddingCache:
    """Get an image's embedding from the store, or encode it exactly once across threads and processes."""

    def __init__(self, store: ByteStore, segmenter: Segmenter, ttl_s: int, lock_timeout_s: float) -> None:
        self.store = store
        self.segmenter = segmenter
        self.ttl_s = ttl_s
        self.lock_timeout_s = lock_timeout_s
        self._stripes = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self.entry_bytes = VIT_ENTRY_BYTES  # the size of the last entry stored or read: the next one's, near enough

    def key(self, image_digest: str) -> str:
        return f"sam:emb:{self.segmenter.identity}:{image_digest}"

    def lookup(self, image_digest: str) -> ImageEmbedding | None:
        data = self.store.get(self.key(image_digest))
        if data is None:
            return None
        self.entry_bytes = len(data)
        return deserialize_embedding(data)

    def get_or_encode(
        self, image_digest: str, load_image: Callable[[], np.ndarray], keep: bool = True
    ) -> CachedEmbedding:
        """`load_image` is only called on a miss, so a cached image is never decoded again. Without `keep` a miss
        is encoded and not stored: for a reader that uses it once (the trainer), whose entries would push the
        images annotators are about to open out of a full cache."""
        (cached,) = self.get_or_encode_many([(image_digest, load_image)], keep=keep)
        return cached

    def get_or_encode_many(
        self, images: list[tuple[str, Callable[[], np.ndarray]]], encode_step: EncodeStep = no_step, keep: bool = True
    ) -> list[CachedEmbedding]:
        """Embeddings of (digest, load_image) pairs, in their order: the misses are encoded together in one
        encoder pass, each image once however often it is listed. The pass runs inside `encode_step(misses)`,
        which may refuse it (a deadline) by raising."""
        results: dict[str, CachedEmbedding] = {}
        loaders: dict[str, Callable[[], np.ndarray]] = {}
        for digest, load_image in images:
            if digest in results or digest in loaders:
                continue
            cached = self.lookup(digest)
            if cached is None:
                loaders[digest] = load_image
            else:
                results[digest] = CachedEmbedding(cached, cache_hit=True)
        if loaders:
            results.update(self._encode_misses(loaders, encode_step, keep))
        return [results[digest] for digest, _ in images]

    def _encode_misses(
        self, loaders: dict[str, Callable[[], np.ndarray]], encode_step: EncodeStep, keep: bool
    ) -> dict[str, CachedEmbedding]:
        """Encode and store (`keep`) the images still missing once this process's and every process's locks for them
        are held. Locks are taken in one global order (stripes by index, then keys sorted), so two batches
        that share images wait for each other instead of deadlocking."""
        keys = {digest: self.key(digest) for digest in loaders}
        stripes = sorted({zlib.crc32(key.encode()) % _LOCK_STRIPES for key in keys.values()})
        with contextlib.ExitStack() as held:
            for stripe in stripes:
                held.enter_context(self._stripes[stripe])
            for key in sorted(keys.values()):
                held.enter_context(self.store.lock(f"{key}:lock", self.lock_timeout_s))
            results: dict[str, CachedEmbedding] = {}
            for digest in loaders:
                # Whoever held the locks before us may have just stored it.
                cached = self.lookup(digest)
                if cached is not None:
                    results[digest] = CachedEmbedding(cached, cache_hit=True)
            missing = [digest for digest in loaders if digest not in results]
            if not missing:
                return results
            started = time.perf_counter()
            with encode_step(len(missing)):
                encoded = self.segmenter.encode_batch([loaders[digest]() for digest in missing])
            elapsed = time.perf_counter() - started
            for digest, embedding in zip(missing, encoded, strict=True):
                data = serialize_embedding(embedding)
                self.entry_bytes = len(data)
                if keep:
                    self.store.set(keys[digest], data, self.ttl_s)
                # Each image is charged its share of the pass, so per-image timings still add up.
                results[digest] = CachedEmbedding(
                    deserialize_embedding(data), cache_hit=False, encode_seconds=elapsed / len(missing)
                )
                # One line per image (operators and the load tests count encodes per image from it).
                log.info(
                    "encoded image %s in a pass of %d (%.2fs, %d bytes %s)",
                    digest[:12],
                    len(missing),
                    elapsed,
                    len(data),
                    "cached" if keep else "used once, not cached",
                )
            return results
