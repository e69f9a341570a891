"""What training and ingestion borrow from a running backend (the loaded SAM, the embedding cache, the
image fetcher), or build once per process where none runs (`shared_resources`: a standalone training)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from backend.cache.embeddings import EmbeddingCache
from backend.cache.store import make_store
from backend.config import Settings
from backend.decoders.serving import ProjectDecoders
from backend.errors import ImageError
from backend.images import FetchRules, ImageFetcher, decode_image, redact_url
from backend.models.base import ImageEmbedding, Segmenter
from backend.models.registry import load_segmenter
from backend.project_files import ProjectFiles
from backend.training.features import TrainingFeatures


@dataclass
class TrainingResources:
    """What training borrows from a running backend (`Predictor.training_resources`), or `shared_resources`."""

    segmenter: Segmenter
    embeddings: EmbeddingCache
    fetcher: ImageFetcher
    max_image_pixels: int
    features_max_bytes: int  # TRAIN_FEATURES_MAX_MB, per project
    decoders: ProjectDecoders | None = None  # set in-process, to get a new version ready before it is asked for

    def features(self, files: ProjectFiles) -> TrainingFeatures:
        return TrainingFeatures(files, self.segmenter.identity, self.features_max_bytes)

    def embedding_for(
        self, image_url: str, expected_digest: str | None, keep: bool = True
    ) -> tuple[ImageEmbedding, str]:
        """The image's embedding and digest; raises ImageError if the URL now serves another image. Without `keep`
        an image not cached is encoded and not stored (`EmbeddingCache.get_or_encode`)."""
        if expected_digest is not None:
            cached = self.embeddings.lookup(expected_digest)
            if cached is not None:
                return cached, expected_digest
        image = self.fetcher.fetch(image_url)
        if expected_digest is not None and image.digest != expected_digest:
            raise ImageError(f"{redact_url(image_url)} now serves another image than the one annotated")
        result = self.embeddings.get_or_encode(
            image.digest, lambda: decode_image(image.data, self.max_image_pixels), keep
        )
        return result.embedding, image.digest

    def embedding_to_train_on(
        self, features: TrainingFeatures, image_url: str, expected_digest: str | None
    ) -> tuple[ImageEmbedding, str]:
        """The features stored for the project's training, or else the image's embedding (cached, or encoded and
        not cached), stored for the next training."""
        if expected_digest is not None:
            stored = features.get(expected_digest)
            if stored is not None:
                return stored, expected_digest
        embedding, digest = self.embedding_for(image_url, expected_digest, keep=False)
        features.put(digest, embedding)
        return embedding, digest


@functools.lru_cache(maxsize=1)
def shared_resources(settings: Settings) -> TrainingResources:
    """Resources for a process that has no backend running (a queue worker); built once per process."""
    segmenter = load_segmenter(settings, decoder_runtime="torch")
    store = make_store(settings.cache_url, settings.memory_cache_bytes)
    embeddings = EmbeddingCache(store, segmenter, settings.embedding_ttl_s, settings.encode_lock_timeout_s)
    return TrainingResources(
        segmenter,
        embeddings,
        ImageFetcher(FetchRules.of(settings)),
        settings.max_image_pixels,
        settings.train_features_max_mb * 2**20,
    )
