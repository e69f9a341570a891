"""From one task and its prompts to labelled masks: fetch the image, get its embedding, decode.

This is where the layers meet in one direction: the protocol layer calls in with parsed requests,
this module asks images, prompts, cache and models, and hands back plain objects that the protocol
layer turns into Label Studio's JSON.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from backend.cache.embeddings import EmbeddingCache
from backend.cache.sessions import SessionStore
from backend.cache.store import ByteStore
from backend.config import Settings
from backend.images import FetchedImage, ImageFetcher, decode_image
from backend.models.base import ImageEmbedding, Segmenter
from backend.models.loader import BackgroundLoader
from backend.models.sam import load_sam
from backend.prompts.interactive import InteractivePrompter, PromptError, parse_context
from backend.training.resources import TrainingResources
from backend.training.service import ActiveLearning
from backend.training.serving import ProjectDecoders

log = logging.getLogger(__name__)


@dataclass
class DetectedObject:
    label: str
    mask: np.ndarray  # (H, W) bool
    score: float
    box: tuple[float, float, float, float] | None = None  # pixel box, when the object came from one


@dataclass
class TaskPrediction:
    objects: list[DetectedObject]
    image_size: tuple[int, int]  # (height, width)
    cache_hit: bool
    timings: dict[str, float] = field(default_factory=dict)
    model_version: str = ""  # the decoder version that made the masks


@dataclass
class Models:
    """Everything that exists only once the weights are loaded."""

    segmenter: Segmenter
    embeddings: EmbeddingCache
    sessions: SessionStore


class Predictor:
    def __init__(self, settings: Settings, store: ByteStore, fetcher: ImageFetcher | None = None) -> None:
        self.settings = settings
        self.store = store
        self.fetcher = fetcher or ImageFetcher(settings)
        self.models = BackgroundLoader(self._load_models)
        self.decoders = ProjectDecoders(settings)
        self.learning = ActiveLearning(settings, self.training_resources, self.decoders)

    def _load_models(self) -> Models:
        settings = self.settings
        segmenter = load_sam(
            settings.sam_checkpoint_path, settings.sam_model_type, settings.device, settings.decoder_runtime
        )
        return self.models_for(segmenter)

    def models_for(self, segmenter: Segmenter) -> Models:
        return Models(
            segmenter=segmenter,
            embeddings=EmbeddingCache(
                self.store, segmenter, self.settings.embedding_ttl_s, self.settings.encode_lock_timeout_s
            ),
            sessions=SessionStore(self.store, segmenter.identity, self.settings.session_ttl_s),
        )

    def training_resources(self) -> TrainingResources:
        models = self.models.get(self.settings.model_ready_timeout_s)
        return TrainingResources(
            models.segmenter, models.embeddings, self.fetcher, self.settings.max_image_pixels, self.decoders
        )

    def segmenter_for(self, models: Models, project_id: int | None) -> tuple[Segmenter, str]:
        """The project's serving decoder (fine-tuned or the original) and the model_version it reports."""
        return self.decoders.serving(project_id, models.segmenter)

    def embedding_for(self, models: Models, image: FetchedImage) -> tuple[ImageEmbedding, bool, float]:
        cached = models.embeddings.get_or_encode(
            image.digest, lambda: decode_image(image.data, self.settings.max_image_pixels)
        )
        return cached.embedding, cached.cache_hit, cached.encode_seconds

    def warm_up(self) -> None:
        """Start loading the models in the background (idempotent), and apply webhook events a previous
        process recorded but did not get to."""
        self.models.start()
        self.learning.start()

    def status(self) -> dict:
        return {"models": self.models.state, "model_error": self.models.error}

    def predict_interactive(
        self, image_url: str, task_id: object, context: object, project_id: int | None = None
    ) -> TaskPrediction:
        """Masks for the smart regions in `context`; an empty context gives no objects, not an error."""
        if not context:
            version = self.decoders.current_name(project_id)
            return TaskPrediction(objects=[], image_size=(0, 0), cache_hit=False, model_version=version)
        started = time.perf_counter()
        image = self.fetcher.fetch(image_url)
        fetch_s = time.perf_counter() - started
        prediction = self.predict_for_image(image, task_id, context, project_id)
        prediction.timings["fetch"] = fetch_s
        return prediction

    def predict_for_image(
        self, image: FetchedImage, task_id: object, context: object, project_id: int | None = None
    ) -> TaskPrediction:
        """The model half of an interactive prediction, for an image already fetched."""
        models = self.models.get(self.settings.model_ready_timeout_s)
        segmenter, version = self.segmenter_for(models, project_id)
        started = time.perf_counter()
        embedding, hit, encode_s = self.embedding_for(models, image)
        embedded = time.perf_counter()
        parsed = parse_context(context, embedding.original_size, self.settings.max_prompts_per_task)
        if parsed.texts and not (parsed.keypoints or parsed.rectangles):
            raise PromptError("text prompts need GroundingDINO, which this backend has not loaded", 422)
        prompter = InteractivePrompter(models.sessions, image.digest, task_id)
        objects = prompter.prompts(parsed)
        predictions = segmenter.decode(embedding, [obj.prompt for obj in objects]) if objects else []
        decoded = time.perf_counter()
        prompter.remember(objects, predictions)
        return TaskPrediction(
            objects=[
                DetectedObject(obj.label, prediction.mask, prediction.score)
                for obj, prediction in zip(objects, predictions, strict=True)
            ],
            image_size=embedding.original_size,
            cache_hit=hit,
            timings={"embedding": embedded - started, "encode": encode_s, "decode": decoded - embedded},
            model_version=version,
        )
