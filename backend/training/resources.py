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
from backend.images import FetchedImage, FetchRules, ImageFetcher, decode_image, redact_url
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
        self, features: TrainingFeatures, image_url: str, expected_digest: str | None
    ) -> tuple[ImageEmbedding, str]:
        """The image's embedding and digest, for training: from the project's feature store, else from the cache,
        else encoded and not cached (the annotator has moved on; caching it would push out the images encoded ahead
        of them), and then stored in the feature store. Raises ImageError if the URL now serves another image."""
        image: FetchedImage | None = None
        if expected_digest is None:
            image = self.fetcher.fetch(image_url)
            digest = image.digest
        else:
            digest = expected_digest
        known = self._stored_or_cached(features, digest)
        if known is not None:
            return known, digest
        if image is None:
            image = self.fetcher.fetch(image_url)
            if image.digest != digest:
                raise ImageError(f"{redact_url(image_url)} now serves another image than the one annotated")
        fetched = image
        result = self.embeddings.get_or_encode(
            digest, lambda: decode_image(fetched.data, self.max_image_pixels), keep=False
        )
        features.put(digest, result.embedding)
        return result.embedding, digest

    def _stored_or_cached(self, features: TrainingFeatures, image_digest: str) -> ImageEmbedding | None:
        stored = features.get(image_digest)
        if stored is not None:
            return stored
        cached = self.embeddings.lookup(image_digest)
        if cached is not None:
            features.put(image_digest, cached)
        return cached


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
