"""SAM image embeddings cached by image content and model identity, encoded once per image.

Value layout: a JSON header line (sizes, shape) followed by the features as raw float16, about
2 MiB for SAM's 256x64x64 embedding. Every decode, cached or fresh, uses the float16 values, so a
click gives the same mask whether the image was just encoded or encoded a day ago elsewhere.
"""

from __future__ import annotations

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


def serialize_embedding(embedding: ImageEmbedding) -> bytes:
    features = np.ascontiguousarray(embedding.features, dtype=np.float16)
    header = {
        "shape": list(features.shape),
        "original_size": list(embedding.original_size),
        "input_size": list(embedding.input_size),
    }
    return json.dumps(header).encode() + b"\n" + features.tobytes()


def deserialize_embedding(data: bytes) -> ImageEmbedding:
    header_bytes, _, payload = data.partition(b"\n")
    header = json.loads(header_bytes)
    features = np.frombuffer(payload, dtype=np.float16).reshape(header["shape"])
    return ImageEmbedding(
        features=features,
        original_size=tuple(header["original_size"]),
        input_size=tuple(header["input_size"]),
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
        self.hits = 0
        self.misses = 0

    def key(self, image_digest: str) -> str:
        return f"sam:emb:{self.segmenter.identity}:{image_digest}"

    def lookup(self, image_digest: str) -> ImageEmbedding | None:
        data = self.store.get(self.key(image_digest))
        return deserialize_embedding(data) if data is not None else None

    def get_or_encode(self, image_digest: str, load_image: Callable[[], np.ndarray]) -> CachedEmbedding:
        """`load_image` is only called on a miss, so a cached image is never decoded again."""
        key = self.key(image_digest)
        cached = self.lookup(image_digest)
        if cached is not None:
            self.hits += 1
            return CachedEmbedding(cached, cache_hit=True)
        stripe = self._stripes[zlib.crc32(key.encode()) % _LOCK_STRIPES]
        with stripe, self.store.lock(f"{key}:lock", self.lock_timeout_s):
            # Whoever held the lock before us may have just stored it.
            cached = self.lookup(image_digest)
            if cached is not None:
                self.hits += 1
                return CachedEmbedding(cached, cache_hit=True)
            started = time.perf_counter()
            fresh = self.segmenter.encode(load_image())
            elapsed = time.perf_counter() - started
            data = serialize_embedding(fresh)
            self.store.set(key, data, self.ttl_s)
            self.misses += 1
            log.info("encoded image %s in %.2fs (%d bytes cached)", image_digest[:12], elapsed, len(data))
            return CachedEmbedding(deserialize_embedding(data), cache_hit=False, encode_seconds=elapsed)
