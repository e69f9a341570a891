"""Pre-annotation of several tasks in this process, a chunk of images at a time (GROUNDING_DINO_BATCH at most, fewer
when a deadline leaves less time): each chunk's
images fetched side by side, searched in one detector pass, segmented from their SAM embeddings, and answered as
Label Studio's JSON as the chunk ends, so memory holds one chunk's images and masks whatever the batch's size."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from backend.cache.detections import DetectionCache
from backend.cache.embeddings import CachedEmbedding
from backend.config import Settings
from backend.deadline import NO_LIMIT, StepTimes, TimeLimit
from backend.decoders.serving import ProjectDecoders
from backend.errors import BackendError, ConfigError, DeadlineExceeded, ImageError
from backend.images import FetchedImage, decode_image
from backend.inference.base import FETCH_THREADS
from backend.inference.loading import Models
from backend.inference.text import TextDetection
from backend.models.base import Segmenter
from backend.models.detector import Detection, Detector
from backend.models.loader import BackgroundLoader
from backend.outcomes import TaskPrediction
from backend.prompts.text import TextQuery, Thresholds, labels_query
from backend.protocol.label_config import ProjectConfig
from backend.protocol.results import RegionRules, TaskAnswer, region_rules, task_answer

log = logging.getLogger(__name__)

BATCH_STEPS = ("fetch", "detect", "encode", "segment")  # what one pre-annotated image goes through, chunk by chunk

EmbeddingsFor = Callable[[Models, Sequence[tuple[FetchedImage, np.ndarray | None]], TimeLimit], list[CachedEmbedding]]


@dataclass(frozen=True)
class BatchSettings:
    """The few settings a batch reads."""

    max_image_pixels: int
    max_objects: int
    chunk_images: int  # GROUNDING_DINO_BATCH, at least 1
    model_ready_timeout_s: float
    region_rules: Callable[[ProjectConfig], RegionRules]  # the polygon and answer-size settings, for a project

    @classmethod
    def of(cls, settings: Settings) -> BatchSettings:
        return cls(
            settings.max_image_pixels,
            settings.max_objects,
            max(settings.grounding_dino_batch, 1),
            settings.model_ready_timeout_s,
            functools.partial(region_rules, settings),
        )


class BatchPreannotation:
    """`Predictor.predict_batch`, with what it shares with the clicks handed in: the models, the detector, the
    embedding cache (`embeddings_for`), the fetcher (`fetch`: a queue worker replaces the predictor's) and the step
    timings that tell whether a step still fits before a deadline."""

    def __init__(
        self,
        settings: BatchSettings,
        models: BackgroundLoader[Models],
        text: TextDetection,
        decoders: ProjectDecoders,
        detections: DetectionCache,
        step_times: StepTimes,
        fetch: Callable[[str], FetchedImage],
        embeddings_for: EmbeddingsFor,
    ) -> None:
        self.settings = settings
        self.models = models
        self.text = text
        self.decoders = decoders
        self.detections = detections
        self.step_times = step_times
        self.fetch = fetch
        self.embeddings_for = embeddings_for

    def _load_image(self, url: object) -> tuple[FetchedImage, np.ndarray] | ImageError:
        try:
            image = self.fetch(url)  # type: ignore[arg-type]  # fetch answers a 400 for what is no URL
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
        the steps' measured times say no more would end before `limit` (one while a step was never measured, which
        is then finished whatever it takes), so that a deadline smaller than a chunk still answers tasks. The images
        of a chunk are fetched side by side and searched for the project's labels in one detector pass, then each
        image's boxes are segmented from its SAM embedding (from the cache, or encoded now and cached, so later
        clicks on the image find it). Boxes are cached per image too, so that no work finished before a deadline is
        done again by the retry. Each task's answer is encoded to Label Studio's JSON as its chunk ends and the masks
        dropped: memory holds one chunk's images and masks, whatever the batch's size.

        Under `limit`, no step (fetch, detect, encode, segment a chunk) starts that would end past it: the
        tasks not done get DeadlineExceeded. A task whose image fails gets its error in place of an answer; a
        problem with the request as a whole raises PromptError."""
        query = labels_query(config)
        thresholds = self.text.thresholds(config)
        detector = self.text.ready(query)
        rules = self.settings.region_rules(config)
        # Boxes alone need no SAM, for projects that only have a RectangleLabels control, nor do the masks of a
        # detector that segments what it finds, unless it reads the segmenter's embeddings.
        needs_segmenter = bool(config.mask_labels) and not detector.makes_masks
        models = (
            self.models.get(self.settings.model_ready_timeout_s) if needs_segmenter or detector.shares_encoder else None
        )
        segmenter, version = (
            self.decoders.serving(project_id, models.segmenter)
            if models
            else (None, self.decoders.current_name(project_id))
        )
        asked = [query.caption, list(query.spans), query.label_groups, thresholds.box, thresholds.text]
        detections_key = DetectionCache.query_key(detector.identity, [*asked, self.settings.max_objects])
        steps = BATCH_STEPS if models else tuple(step for step in BATCH_STEPS if step != "encode")
        most = self.settings.chunk_images
        outcomes: list[TaskAnswer | BackendError] = []
        while len(outcomes) < len(image_urls):
            first = len(outcomes)
            urls = image_urls[first : first + self.step_times.images_within(steps, most, limit)]
            # The first image of a process whose steps were never measured is finished once started, whatever it
            # takes: stopping it between steps would answer nothing and measure nothing.
            unmeasured = first == 0 and self.step_times.per_image(steps) is None and not limit.expired()
            try:
                outcomes += self._preannotate(
                    urls,
                    detector,
                    detections_key,
                    models,
                    segmenter,
                    version,
                    query,
                    thresholds,
                    config,
                    rules,
                    NO_LIMIT if unmeasured else limit,
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
        # A detector that reads the segmenter's embeddings needs them first; otherwise they come after detecting.
        encoded = self.embeddings_for(models, images, limit) if models and detector.shares_encoder else None
        detect_started = time.perf_counter()
        found = iter(self._detections(detector, detections_key, images, query, thresholds, limit, encoded))
        detect_share = (time.perf_counter() - detect_started) / max(len(images), 1)
        if encoded is None:
            encoded = self.embeddings_for(models, images, limit) if models else []
        embeddings = iter(encoded)
        outcomes: list[TaskAnswer | BackendError] = []
        with self.step_times.step("segment", len(images), limit):
            for item in loaded:
                if isinstance(item, ImageError):
                    outcomes.append(item)
                    continue
                _, pixels = item
                segment_started = time.perf_counter()
                cached = next(embeddings, None)
                objects = self.text.segment(segmenter, cached.embedding if cached else None, next(found), query, config)
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
        encoded: list[CachedEmbedding] | None = None,
    ) -> list[list[Detection]]:
        """Each image's boxes: from the cache, the others found in one detector pass (from their `encoded`
        embeddings, for a detector that reads them) and cached."""
        found = [self.detections.get(detections_key, image.digest) for image, _ in images]
        missing = [index for index, detections in enumerate(found) if detections is None]
        if missing:
            started = time.perf_counter()
            with self.step_times.step("detect", len(missing), limit):
                if encoded is not None:
                    embeddings = [encoded[index].embedding for index in missing]
                    detected = self.text.detect(detector, embeddings, query, thresholds)
                else:
                    detected = self.text.detect(detector, [images[index][1] for index in missing], query, thresholds)
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
