"""Loading this process's models off the request path: SAM first (clicks need it), then the optional detector.

`Models` is what exists only once SAM's weights are loaded: the segmenter and the caches keyed by its identity.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.cache.embeddings import EmbeddingCache
from backend.cache.sessions import SessionStore
from backend.cache.store import ByteStore
from backend.config import Settings
from backend.models.base import Segmenter
from backend.models.detector import Detector
from backend.models.loader import BackgroundLoader
from backend.models.registry import load_detector, load_segmenter


@dataclass
class Models:
    """Everything that exists only once the weights are loaded."""

    segmenter: Segmenter  # SAM's mask decoder is what active learning fine-tunes (`training_resources`)
    embeddings: EmbeddingCache
    sessions: SessionStore


class ModelLoading:
    """SAM and its caches (`models`), then the detector (`detector`), each loaded once in the background. The
    model settings go to the registry whole: it alone reads them (docs/architecture.md)."""

    def __init__(self, settings: Settings, store: ByteStore) -> None:
        self.settings = settings
        self.store = store
        self.models = BackgroundLoader(self._load_models)
        # Optional: without the detector's weights SAM still serves clicks; text and pre-annotation say why not.
        self.detector = BackgroundLoader(self._load_detector)

    def _load_models(self) -> Models:
        segmenter = load_segmenter(self.settings)
        self.detector.start()  # after SAM, which clicks need first
        return self.models_for(segmenter)

    def models_for(self, segmenter: Segmenter) -> Models:
        return Models(
            segmenter=segmenter,
            embeddings=EmbeddingCache(
                self.store, segmenter, self.settings.embedding_ttl_s, self.settings.encode_lock_timeout_s
            ),
            sessions=SessionStore(self.store, segmenter.identity, self.settings.session_ttl_s),
        )

    def _load_detector(self) -> Detector:
        return load_detector(self.settings)
