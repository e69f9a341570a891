"""From one task and its prompts to labelled masks, in this process: fetch the image, get its embedding, decode.

This is where the layers meet in one direction: the protocol layer calls in with parsed requests, and `Predictor`
asks images, prompts, cache and models, and hands back plain objects that the protocol layer turns into Label
Studio's JSON. `Predictor` itself serves the clicks and the embedding cache; it hands the rest to its collaborators:
loading the models (`loading`), encoding ahead of the annotator (`encode_ahead`), text detection (`text`),
pre-annotation batches (`batches`) and the per-project record of cached images (`bookkeeping.coverage`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from backend.bookkeeping.coverage import CoverageRecorder
from backend.cache.detections import DetectionCache
from backend.cache.digests import ImageDigests
from backend.cache.embeddings import CachedEmbedding
from backend.cache.store import ByteStore
from backend.config import Settings
from backend.deadline import NO_LIMIT, StepTimes, TimeLimit
from backend.decoders.serving import ProjectDecoders
from backend.errors import BackendError, ImageError
from backend.images import FetchedImage, FetchRules, ImageFetcher, decode_image
from backend.inference.base import InteractiveFront, StepReport
from backend.inference.batches import BatchPreannotation, BatchSettings
from backend.inference.encode_ahead import EncodeAhead, Step
from backend.inference.loading import ModelLoading, Models
from backend.inference.text import DetectionSettings, TextDetection
from backend.inference.video import VideoSettings, VideoTracking, label_detector
from backend.models.base import ImageEmbedding, Segmenter
from backend.models.loader import BackgroundLoader
from backend.models.registry import load_video
from backend.outcomes import DetectedObject, TaskPrediction, iou_score
from backend.project_files import ProjectFiles
from backend.prompts.interactive import ContextPrompts, InteractivePrompter
from backend.protocol.label_config import ProjectConfig, VideoConfig
from backend.protocol.results import TaskAnswer
from backend.protocol.video import VideoObject
from backend.training.resources import TrainingResources
from backend.training.service import ActiveLearning, LearningSettings
from backend.training.trainer import TrainingResult, train_project


class Predictor(InteractiveFront):
    def __init__(self, settings: Settings, store: ByteStore, fetcher: ImageFetcher | None = None) -> None:
        self.settings = settings
        self.store = store
        self.fetcher = fetcher or ImageFetcher(FetchRules.of(settings))
        self.loading = ModelLoading(settings, store)
        self.models = self.loading.models
        self.detector = self.loading.detector
        self.decoders = ProjectDecoders(
            settings.model_dir, lambda: settings.base_model_version, settings.model_version_pin
        )
        self.learning = ActiveLearning(
            LearningSettings.of(settings), self.training_resources, self.decoders, train=self.train_project
        )
        self.step_times = StepTimes()
        self.coverage = CoverageRecorder(settings.model_dir)
        self.digests = ImageDigests(store, settings.embedding_ttl_s)
        self.text = TextDetection(self.detector, DetectionSettings.of(settings))
        # Loaded at the first video task: an image project never pays for the video predictor.
        self.video = VideoTracking(
            VideoSettings.of(settings),
            lambda url, transfer: self.fetcher.fetch_to_file(url, transfer),
            BackgroundLoader(lambda: load_video(settings)),
            label_detector(self.text, lambda: self.models.get(settings.model_ready_timeout_s), settings),
        )
        self.batches = BatchPreannotation(
            BatchSettings.of(settings),
            self.models,
            self.text,
            self.decoders,
            DetectionCache(store, settings.embedding_ttl_s),
            self.step_times,
            lambda url: self.fetcher.fetch(url),  # read when called: a queue worker installs its own fetcher
            self.embeddings_for,
        )
        self.encoding_ahead = EncodeAhead(
            self.models,
            store,
            self.digests,
            self.coverage,
            self.encode_url,
            settings.model_dir,
            settings.prefetch_tasks,
            settings.encode_on_import,
            settings.model_ready_timeout_s,
        )
        self.ahead = self.encoding_ahead.pool

    def train_project(self, project_id: int) -> TrainingResult:
        """Fine-tune the project's decoder now, in this thread, on this process's models."""
        return train_project(project_id, self.settings, self.training_resources())

    def training_resources(self) -> TrainingResources:
        models = self.models.get(self.settings.model_ready_timeout_s)
        return TrainingResources(
            models.segmenter,
            models.embeddings,
            self.fetcher,
            self.settings.max_image_pixels,
            self.settings.train_features_max_mb * 2**20,
            self.decoders,
        )

    def segmenter_for(self, models: Models, project_id: int | None) -> tuple[Segmenter, str]:
        """The project's serving decoder (fine-tuned or the original) and the model_version it reports."""
        return self.decoders.serving(project_id, models.segmenter)

    def parallel_batches(self) -> int:
        """One batch at a time: this process's models are the only ones."""
        return 1

    def warm_up(self) -> None:
        """Start loading the models in the background, and apply webhook events recorded but not applied."""
        self.models.start()
        self.learning.start()

    def cache_store(self) -> ByteStore:
        return self.store

    def track_video(
        self,
        video_url: object,
        objects: Sequence[VideoObject],
        config: VideoConfig,
        limit: TimeLimit,
        on_step: StepReport | None = None,
    ) -> list[dict]:
        return self.video.track(video_url, objects, config, limit, on_step)

    def status(self) -> dict:
        return {
            "models": self.models.state,
            "model_error": self.models.error,
            "detector": self.detector.state,
            "detector_error": self.detector.error,
            **self.store.describe(),
        }

    def read_context(self, context: object, config: ProjectConfig) -> ContextPrompts:
        """As `InteractiveFront.read_context`, and a text prompt the detector cannot answer is refused before its
        image is fetched."""
        prompts = super().read_context(context, config)
        self.text.refuse_unanswerable(prompts, config)
        return prompts

    def embedding_for(
        self, models: Models, image: FetchedImage, pixels: np.ndarray | None = None, project_id: int | None = None
    ) -> tuple[ImageEmbedding, bool, float]:
        """The image's SAM embedding from the cache, encoded (from `pixels` when already decoded) on a miss; one
        encoded for a project is recorded in its list (`EncodedImages`), which /status counts."""
        (cached,) = self.embeddings_for(models, [(image, pixels)])
        if project_id is not None and not cached.cache_hit:
            self.record_encoded(models, project_id, image)
        return cached.embedding, cached.cache_hit, cached.encode_seconds

    def record_encoded(self, models: Models, project_id: int, image: FetchedImage) -> None:
        self.coverage.record(project_id, models.embeddings.key(image.digest))

    def embeddings_for(
        self, models: Models, images: Sequence[tuple[FetchedImage, np.ndarray | None]], limit: TimeLimit = NO_LIMIT
    ) -> list[CachedEmbedding]:
        """Several images' SAM embeddings from the cache; the misses go through the encoder together, unless
        that pass would end past `limit`."""
        return models.embeddings.get_or_encode_many(
            [(image.digest, self._loader(image, pixels)) for image, pixels in images],
            lambda misses: self.step_times.step("encode", misses, limit),
        )

    def _loader(self, image: FetchedImage, pixels: np.ndarray | None) -> Callable[[], np.ndarray]:
        return lambda: pixels if pixels is not None else decode_image(image.data, self.settings.max_image_pixels)

    def encode_url(self, image_url: str, project_id: int | None = None) -> bool:
        """Fetch an image and cache its embedding unless cached already; True if it was (nothing encoded). Either
        way the image is recorded as the project's: it may have been cached for another project."""
        models = self.models.get(self.settings.model_ready_timeout_s)
        image = self.fetcher.fetch(image_url)
        self.digests.remember(image_url, image.digest)
        _, hit, _ = self.embedding_for(models, image)
        if project_id is not None:
            self.record_encoded(models, project_id, image)
        return hit

    def encode_batch(self, image_urls: Sequence[object], project_id: int | None = None) -> list[bool | BackendError]:
        outcomes: list[bool | BackendError] = []
        for image_url in image_urls:
            try:
                outcomes.append(self.encode_url(image_url, project_id))  # type: ignore[arg-type]  # fetch answers 400
            except ImageError as error:
                outcomes.append(error)
        return outcomes

    def encode_ahead(self, project_id: int, prefetched: Callable[[], str | None], imports: bool) -> Step:
        """One step of encoding ahead (`EncodeAhead.step`); a queue worker's encoding job runs it."""
        return self.encoding_ahead.step(project_id, prefetched, imports)

    def encode_imports(self, project_id: int) -> None:
        self.encoding_ahead.schedule(project_id)

    def prefetch(self, project_id: int, task_id: int) -> None:
        self.encoding_ahead.prefetch(project_id, task_id)

    def predict_for_image(
        self,
        image: FetchedImage,
        task_id: object,
        prompts: ContextPrompts,
        project_id: int | None = None,
        config: ProjectConfig | None = None,
    ) -> TaskPrediction:
        """The model half of an interactive prediction, for an image already fetched."""
        models = self.models.get(self.settings.model_ready_timeout_s)
        segmenter, version = self.segmenter_for(models, project_id)
        # Again here: on a queue worker, whose detector the web tier cannot see, it is the first check.
        self.text.refuse_unanswerable(prompts, config)
        started = time.perf_counter()
        embedding, hit, encode_s = self.embedding_for(models, image, project_id=project_id)
        if project_id is not None and self.learning.settings.refusal is None:  # its segmenter fine-tunes
            self._keep_for_training(project_id, image, embedding)
        embedded = time.perf_counter()
        prompter = InteractivePrompter(models.sessions, image.digest, task_id)
        objects = prompter.prompts(prompts.in_pixels(embedding.original_size))
        predictions = segmenter.decode(embedding, [obj.prompt for obj in objects]) if objects else []
        decoded = time.perf_counter()
        prompter.remember(objects, predictions)
        detected = [
            DetectedObject(obj.label, prediction.mask, iou_score(prediction.score))
            for obj, prediction in zip(objects, predictions, strict=True)
        ]
        timings = {"embedding": embedded - started, "encode": encode_s, "decode": decoded - embedded}
        if prompts.texts:
            detected += self.text.objects(
                segmenter, image, embedding, prompts.texts, prompts.text_label, config, timings
            )
        if prompts.exemplars:
            exemplars = prompts.in_pixels(embedding.original_size).exemplars
            detected += self.text.exemplar_objects(image, embedding, exemplars, config, timings)
        return TaskPrediction(
            objects=detected,
            image_size=embedding.original_size,
            cache_hit=hit,
            timings=timings,
            model_version=version,
        )

    def _keep_for_training(self, project_id: int, image: FetchedImage, embedding: ImageEmbedding) -> None:
        """Store a clicked image's features for the training of a project that learns (its webhooks have sent
        annotations): by the time the annotation's event is applied, an LRU cache smaller than the project may have
        evicted the image, and encoding it again there took CPU from encoding ahead. A project without webhooks
        stores nothing, as nothing would clean its store."""
        files = ProjectFiles(self.settings.model_dir, project_id)
        if files.annotations.is_dir():
            self.training_resources().features(files).put(image.digest, embedding)

    def predict_text(self, image: FetchedImage, texts: list[str], config: ProjectConfig) -> TaskPrediction:
        """Masks for a typed prompt in an image already at hand (the CLI and the demo app)."""
        models = self.models.get(self.settings.model_ready_timeout_s)
        embedding, hit, encode_s = self.embedding_for(models, image)
        timings = {"encode": encode_s, "decode": 0.0}
        objects = self.text.objects(models.segmenter, image, embedding, texts, None, config, timings)
        return TaskPrediction(objects=objects, image_size=embedding.original_size, cache_hit=hit, timings=timings)

    def predict_batch(
        self,
        image_urls: Sequence[object],
        config: ProjectConfig,
        project_id: int | None = None,
        limit: TimeLimit = NO_LIMIT,
    ) -> list[TaskAnswer | BackendError]:
        return self.batches.predict_batch(image_urls, config, project_id, limit)
