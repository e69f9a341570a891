"""From one task and its prompts to labelled masks: fetch the image, get its embedding, decode.

This is where the layers meet in one direction: the protocol layer calls in with parsed requests,
this module asks images, prompts, cache and models, and hands back plain objects that the protocol
layer turns into Label Studio's JSON. Pre-annotation batches are the exception: each task is encoded (by
the protocol layer's `task_answer`) as its chunk ends, so a batch never holds more than a chunk of masks.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from backend.cache.coverage import EncodedImages
from backend.cache.detections import DetectionCache
from backend.cache.embeddings import CachedEmbedding, EmbeddingCache
from backend.cache.sessions import SessionStore
from backend.cache.store import ByteStore
from backend.config import Settings
from backend.deadline import NO_LIMIT, StepTimes, TimeLimit
from backend.decoders.serving import ProjectDecoders
from backend.errors import BackendError, ConfigError, DeadlineExceeded, ImageError, ModelNotReady, PromptError
from backend.images import FetchedImage, FetchRules, ImageFetcher, decode_image
from backend.inference.background import BackgroundEncoder
from backend.inference.base import FETCH_THREADS, InteractiveFront
from backend.models.base import ImageEmbedding, Segmenter, SegmentPrompt
from backend.models.detector import Detection, Detector
from backend.models.loader import BackgroundLoader
from backend.models.registry import load_detector, load_segmenter
from backend.outcomes import DetectedObject, TaskPrediction, iou_score
from backend.project_files import ProjectFiles
from backend.prompts.interactive import ContextPrompts, InteractivePrompter
from backend.prompts.text import TextQuery, Thresholds, labels_query, text_query, thresholds_for
from backend.protocol.label_config import ProjectConfig
from backend.protocol.results import RegionRules, TaskAnswer, region_rules, task_answer
from backend.training.imports import ImportedTasks
from backend.training.resources import TrainingResources
from backend.training.service import ActiveLearning
from backend.training.trainer import TrainingResult, train_project

log = logging.getLogger(__name__)

BATCH_STEPS = ("fetch", "detect", "encode", "segment")  # what one pre-annotated image goes through, chunk by chunk


@dataclass
class Models:
    """Everything that exists only once the weights are loaded."""

    segmenter: Segmenter  # SAM's mask decoder is what active learning fine-tunes (`training_resources`)
    embeddings: EmbeddingCache
    sessions: SessionStore


class Predictor(InteractiveFront):
    def __init__(self, settings: Settings, store: ByteStore, fetcher: ImageFetcher | None = None) -> None:
        self.settings = settings
        self.store = store
        self.fetcher = fetcher or ImageFetcher(FetchRules.of(settings))
        self.models = BackgroundLoader(self._load_models)
        # Optional: without the detector's weights SAM still serves clicks; text and pre-annotation say why not.
        self.detector = BackgroundLoader(self._load_detector)
        self.decoders = ProjectDecoders(
            settings.model_dir, lambda: settings.base_model_version, settings.model_version_pin
        )
        self.learning = ActiveLearning(settings, self.training_resources, self.decoders, train=self.train_project)
        self.detections = DetectionCache(store, settings.embedding_ttl_s)
        self.step_times = StepTimes()
        self.ahead = BackgroundEncoder()
        self._prefetch: dict[int, collections.deque[str]] = {}  # per project: images to encode before imported ones
        self._prefetch_mutex = threading.Lock()

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

    def train_project(self, project_id: int) -> TrainingResult:
        """Fine-tune the project's decoder now, in this thread, on this process's models."""
        return train_project(project_id, self.settings, self.training_resources())

    def training_resources(self) -> TrainingResources:
        models = self.models.get(self.settings.model_ready_timeout_s)
        return TrainingResources(
            models.segmenter, models.embeddings, self.fetcher, self.settings.max_image_pixels, self.decoders
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
        self._refuse_unanswerable_text(prompts, config)
        return prompts

    def _refuse_unanswerable_text(self, prompts: ContextPrompts, config: ProjectConfig | None) -> None:
        """A text prompt's 503 (the detector could not be loaded) or 413 (too long for it) before any work on its
        image. While the detector still loads, the image is fetched and encoded meanwhile."""
        if prompts.texts and self.detector.state in ("ready", "failed"):
            self.detector_ready(text_query(prompts.texts, self._text_config(config), prompts.text_label))

    def _load_detector(self) -> Detector:
        return load_detector(self.settings)

    def detector_ready(self, query: TextQuery) -> Detector:
        """The detector, able to read `query`'s caption; a 503 naming what is missing if it could not load."""
        try:
            detector = self.detector.get(self.settings.model_ready_timeout_s)
        except ModelNotReady:
            if self.detector.state != "failed":
                raise  # still loading: a 503 that says to retry
            raise PromptError(
                f"text prompts and pre-annotation need the detector (DETECTOR={self.settings.detector}), which could "
                f"not be loaded: {self.detector.error}",
                503,
            ) from None
        tokens = detector.text_tokens(query.caption, list(query.spans))
        if tokens > detector.max_text_tokens:
            raise PromptError(
                f"the {len(query.phrases)} phrases to detect take {tokens} tokens; {detector.name} reads at most "
                f"{detector.max_text_tokens}: use fewer labels or shorter predicted_values",
                413,
            )
        return detector

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
        EncodedImages(ProjectFiles(self.settings.model_dir, project_id)).record(models.embeddings.key(image.digest))

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

    def encode_ahead(self, project_id: int, prefetched: Callable[[], str | None], imports: bool) -> bool:
        """Encode one image ahead of the annotator: the next one `prefetched` names (the tasks after the one just
        asked for), else, with `imports` (ENCODE_ON_IMPORT), the project's next imported task (`ImportedTasks`);
        False when none is left. An image that cannot be fetched is logged and passed over."""
        models = self.models.get(self.settings.model_ready_timeout_s)  # first: a loading model keeps the task listed
        if not self.store.has_room(models.embeddings.entry_bytes):
            # Encoding ahead must never evict an embedding an annotator is using: stop; the next request resumes.
            log.info("project %d: the cache is near its bound; encoding ahead stops", project_id)
            return False
        image_url = prefetched()
        if image_url is None and not imports:
            return False
        if image_url is None:
            task = ImportedTasks(ProjectFiles(self.settings.model_dir, project_id)).take()
            if task is None:
                return False
            image_url = task.image_url
        try:
            self.encode_url(image_url, project_id)
        except ImageError as error:
            log.warning("project %d: image %s not encoded ahead: %s", project_id, image_url, error)
        return True

    def encode_imports(self, project_id: int) -> None:
        """Encode the project's prefetched and (ENCODE_ON_IMPORT) imported tasks' images in the background, on the
        pool of one."""
        imports = self.settings.encode_on_import
        self.ahead.schedule(
            project_id, lambda: self.encode_ahead(project_id, lambda: self._next_prefetched(project_id), imports)
        )

    def prefetch(self, project_id: int, task_id: int) -> None:
        """Encode the next PREFETCH_TASKS imported tasks after `task_id` before any other waiting import."""
        following = ImportedTasks(ProjectFiles(self.settings.model_dir, project_id)).following(
            task_id, self.settings.prefetch_tasks
        )
        if not following:
            return
        with self._prefetch_mutex:  # the annotator moved on: the tasks after the newest request replace the others
            self._prefetch[project_id] = collections.deque(task.image_url for task in following)
        self.encode_imports(project_id)

    def _next_prefetched(self, project_id: int) -> str | None:
        with self._prefetch_mutex:
            waiting = self._prefetch.get(project_id)
            return waiting.popleft() if waiting else None

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
        self._refuse_unanswerable_text(prompts, config)
        started = time.perf_counter()
        embedding, hit, encode_s = self.embedding_for(models, image, project_id=project_id)
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
            detected += self._text_objects(
                segmenter, image, embedding, prompts.texts, prompts.text_label, config, timings
            )
        return TaskPrediction(
            objects=detected,
            image_size=embedding.original_size,
            cache_hit=hit,
            timings=timings,
            model_version=version,
        )

    def predict_text(self, image: FetchedImage, texts: list[str], config: ProjectConfig) -> TaskPrediction:
        """Masks for a typed prompt in an image already at hand (the CLI and the demo app)."""
        models = self.models.get(self.settings.model_ready_timeout_s)
        embedding, hit, encode_s = self.embedding_for(models, image)
        timings = {"encode": encode_s, "decode": 0.0}
        objects = self._text_objects(models.segmenter, image, embedding, texts, None, config, timings)
        return TaskPrediction(objects=objects, image_size=embedding.original_size, cache_hit=hit, timings=timings)

    def _text_objects(
        self,
        segmenter: Segmenter,
        image: FetchedImage,
        embedding: ImageEmbedding,
        texts: list[str],
        selected_label: str | None,
        config: ProjectConfig | None,
        timings: dict[str, float],
    ) -> list[DetectedObject]:
        """Masks for what a typed prompt names in this image."""
        config = self._text_config(config)
        query = text_query(texts, config, selected_label)
        thresholds = thresholds_for(config, self.settings.box_threshold, self.settings.text_threshold)
        detector = self.detector_ready(query)
        started = time.perf_counter()
        (detections,) = self._detect(
            detector, [decode_image(image.data, self.settings.max_image_pixels)], query, thresholds
        )
        detected = time.perf_counter()
        objects = self._segment_detections(segmenter, embedding, detections, query, config)
        timings.update({"detect": detected - started, "decode": timings["decode"] + time.perf_counter() - detected})
        return objects

    @staticmethod
    def _text_config(config: ProjectConfig | None) -> ProjectConfig:
        if config is None:
            raise PromptError("text prompts need the project's label config to name their labels", 422)
        return config

    def _detect(
        self, detector: Detector, images: list[np.ndarray], query: TextQuery, thresholds: Thresholds
    ) -> list[list[Detection]]:
        return detector.detect(
            images,
            query.caption,
            list(query.spans),
            query.label_groups,
            thresholds.box,
            thresholds.text,
            self.settings.max_objects,
            self.settings.grounding_dino_batch,
        )

    def _segment_detections(
        self,
        segmenter: Segmenter | None,
        embedding: ImageEmbedding | None,
        detections: list[Detection],
        query: TextQuery,
        config: ProjectConfig,
    ) -> list[DetectedObject]:
        """One object per box: SAM decodes every box of the image in one batched call (when the project has a
        BrushLabels or PolygonLabels control for its label); the object's score is the detector's box score times SAM's
        predicted IoU, so Label Studio can sort by either model's doubt."""
        labels = [query.labels[detection.phrase] for detection in detections]
        masked = [index for index, label in enumerate(labels) if label in config.mask_labels]
        predictions = {}
        if masked and segmenter is not None and embedding is not None:
            prompts = [SegmentPrompt(box=detections[index].box) for index in masked]
            predictions = dict(zip(masked, segmenter.decode(embedding, prompts), strict=True))
        objects = []
        for index, (detection, label) in enumerate(zip(detections, labels, strict=True)):
            prediction = predictions.get(index)
            if prediction is None:
                objects.append(DetectedObject(label, None, detection.score, detection.box))
                continue
            score = detection.score * iou_score(prediction.score)
            objects.append(DetectedObject(label, prediction.mask, score, detection.box))
        return objects

    def _load_image(self, url: object) -> tuple[FetchedImage, np.ndarray] | ImageError:
        try:
            image = self.fetcher.fetch(url)  # type: ignore[arg-type]  # fetch answers a 400 for what is no URL
            return image, decode_image(image.data, self.settings.max_image_pixels)
        except ImageError as error:
            return error

    def predict_batch(
        self,
        image_urls: Sequence[object],
        config: ProjectConfig,
        project_id: int | None = None,
        limit: TimeLimit = NO_LIMIT,
    ) -> list[TaskAnswer | BackendError]:
        """Pre-annotation of several tasks, a chunk of images at a time: GROUNDING_DINO_BATCH at most, fewer when
        the steps' measured times say no more would end before `limit` (one while a step was never measured), so
        that a deadline smaller than a chunk still answers tasks. The images of a chunk are fetched side by side
        and searched for the project's labels in one detector pass, then each image's boxes are segmented from its
        SAM embedding (from the cache, or encoded now and cached, so later clicks on the image find it). Boxes are
        cached per image too, so that no work finished before a deadline is done again by the retry. Each task's
        answer is encoded to Label Studio's JSON as its chunk ends and the masks dropped: memory holds one chunk's
        images and masks, whatever the batch's size.

        Under `limit`, no step (fetch, detect, encode, segment a chunk) starts that would end past it: the
        tasks not done get DeadlineExceeded. A task whose image fails gets its error in place of an answer; a
        problem with the request as a whole raises PromptError."""
        query = labels_query(config)
        thresholds = thresholds_for(config, self.settings.box_threshold, self.settings.text_threshold)
        detector = self.detector_ready(query)
        rules = region_rules(self.settings, config)
        # Boxes alone need no SAM, for projects that only have a RectangleLabels control.
        models = self.models.get(self.settings.model_ready_timeout_s) if config.mask_labels else None
        segmenter, version = (
            self.segmenter_for(models, project_id) if models else (None, self.decoders.current_name(project_id))
        )
        asked = [query.caption, list(query.spans), query.label_groups, thresholds.box, thresholds.text]
        detections_key = DetectionCache.query_key(detector.identity, [*asked, self.settings.max_objects])
        steps = BATCH_STEPS if models else tuple(step for step in BATCH_STEPS if step != "encode")
        most = max(self.settings.grounding_dino_batch, 1)
        outcomes: list[TaskAnswer | BackendError] = []
        while len(outcomes) < len(image_urls):
            first = len(outcomes)
            urls = image_urls[first : first + self.step_times.images_within(steps, most, limit)]
            try:
                outcomes += self._preannotate(
                    urls, detector, detections_key, models, segmenter, version, query, thresholds, config, rules, limit
                )
            except DeadlineExceeded as error:
                if len(urls) > 1:
                    most = 1  # a step ran slower than measured: what it finished is cached, one image may still fit
                    continue
                log.info("pre-annotation stopped at its deadline: %d of %d tasks done", first, len(image_urls))
                outcomes += [error] * (len(image_urls) - first)
        return outcomes

    def _preannotate(
        self,
        image_urls: Sequence[object],
        detector: Detector,
        detections_key: str,
        models: Models | None,
        segmenter: Segmenter | None,
        version: str,
        query: TextQuery,
        thresholds: Thresholds,
        config: ProjectConfig,
        rules: RegionRules,
        limit: TimeLimit,
    ) -> list[TaskAnswer | BackendError]:
        """One chunk, each step under `limit`."""
        started = time.perf_counter()
        with self.step_times.step("fetch", len(image_urls), limit):
            with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(image_urls))) as pool:
                loaded = list(pool.map(self._load_image, image_urls))
        fetched = time.perf_counter()
        images = [item for item in loaded if isinstance(item, tuple)]
        found = iter(self._detections(detector, detections_key, images, query, thresholds, limit))
        detect_share = (time.perf_counter() - fetched) / max(len(images), 1)
        embeddings = iter(self.embeddings_for(models, images, limit) if models else [])
        outcomes: list[TaskAnswer | BackendError] = []
        with self.step_times.step("segment", len(images), limit):
            for item in loaded:
                if isinstance(item, ImageError):
                    outcomes.append(item)
                    continue
                _, pixels = item
                segment_started = time.perf_counter()
                cached = next(embeddings, None)
                objects = self._segment_detections(
                    segmenter, cached.embedding if cached else None, next(found), query, config
                )
                prediction = TaskPrediction(
                    objects=objects,
                    image_size=(pixels.shape[0], pixels.shape[1]),
                    cache_hit=cached.cache_hit if cached else False,
                    timings={
                        "fetch": fetched - started,
                        "detect": detect_share,
                        "encode": cached.encode_seconds if cached else 0.0,
                        "decode": time.perf_counter() - segment_started,
                    },
                    model_version=version,
                )
                try:
                    outcomes.append(task_answer(prediction, config, version, rules))
                except ConfigError as error:
                    outcomes.append(error)
        return outcomes

    def _detections(
        self,
        detector: Detector,
        detections_key: str,
        images: list[tuple[FetchedImage, np.ndarray]],
        query: TextQuery,
        thresholds: Thresholds,
        limit: TimeLimit,
    ) -> list[list[Detection]]:
        """Each image's boxes: from the cache, the others found in one detector pass and cached."""
        found = [self.detections.get(detections_key, image.digest) for image, _ in images]
        missing = [index for index, detections in enumerate(found) if detections is None]
        if missing:
            started = time.perf_counter()
            with self.step_times.step("detect", len(missing), limit):
                detected = self._detect(detector, [images[index][1] for index in missing], query, thresholds)
            for index, detections in zip(missing, detected, strict=True):
                self.detections.put(detections_key, images[index][0].digest, detections)
                found[index] = detections
            # One line per pass, naming its images (operators and the tests see which images were detected).
            log.info(
                "detected %d images in one pass (%.2fs): %s",
                len(missing),
                time.perf_counter() - started,
                " ".join(images[index][0].digest[:12] for index in missing),
            )
        return [detections for detections in found if detections is not None]
