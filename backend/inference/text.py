"""Text detection in this process: the detector's boxes for a caption, each segmented by SAM into a mask.

Text prompts (a typed text on a click) and pre-annotation (the project's labels as the caption) both ask here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from backend.config import Settings
from backend.errors import ModelNotReady, PromptError
from backend.images import FetchedImage, decode_image
from backend.models.base import ImageEmbedding, Segmenter, SegmentPrompt
from backend.models.detector import Detection, Detector, Picture
from backend.models.loader import BackgroundLoader
from backend.models.sam3_detector import Sam3Detector
from backend.outcomes import DetectedObject, iou_score
from backend.prompts.interactive import Box, ContextPrompts
from backend.prompts.text import TextQuery, Thresholds, text_query, thresholds_for
from backend.protocol.label_config import ProjectConfig


@dataclass(frozen=True)
class DetectionSettings:
    """The settings text detection reads (DETECTOR, BOX_THRESHOLD, TEXT_THRESHOLD, MAX_OBJECTS, ...)."""

    detector: str
    model_ready_timeout_s: float
    box_threshold: float
    text_threshold: float
    max_objects: int
    grounding_dino_batch: int
    max_image_pixels: int

    @classmethod
    def of(cls, settings: Settings) -> DetectionSettings:
        return cls(
            settings.detector,
            settings.model_ready_timeout_s,
            settings.box_threshold,
            settings.text_threshold,
            settings.max_objects,
            settings.grounding_dino_batch,
            settings.max_image_pixels,
        )


class TextDetection:
    def __init__(self, detector: BackgroundLoader[Detector], settings: DetectionSettings) -> None:
        self.detector = detector
        self.settings = settings

    def thresholds(self, config: ProjectConfig) -> Thresholds:
        return thresholds_for(config, self.settings.box_threshold, self.settings.text_threshold)

    def refuse_unanswerable(self, prompts: ContextPrompts, config: ProjectConfig | None) -> None:
        """A text prompt's 503 (the detector could not be loaded) or 413 (too long for it) before any work on its
        image. While the detector still loads, the image is fetched and encoded meanwhile."""
        if prompts.texts and self.detector.state in ("ready", "failed"):
            self.ready(text_query(prompts.texts, self.config_of(config), prompts.text_label))

    def ready(self, query: TextQuery) -> Detector:
        """The detector, able to read `query`'s caption; a 503 naming what is missing if it could not load."""
        detector = self.loaded()
        tokens = detector.text_tokens(query.caption, list(query.spans))
        if tokens > detector.max_text_tokens:
            raise PromptError(
                f"the {len(query.phrases)} phrases to detect take {tokens} tokens; {detector.name} reads at most "
                f"{detector.max_text_tokens}: use fewer labels or shorter predicted_values",
                413,
            )
        return detector

    def loaded(self) -> Detector:
        """The detector; a 503 naming what is missing if it could not load."""
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
        return detector

    def objects(
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
        config = self.config_of(config)
        query = text_query(texts, config, selected_label)
        thresholds = self.thresholds(config)
        detector = self.ready(query)
        started = time.perf_counter()
        if detector.shares_encoder:
            (detections,) = self.detect(detector, [embedding], query, thresholds)
        else:
            pixels = decode_image(image.data, self.settings.max_image_pixels)
            (detections,) = self.detect(detector, [pixels], query, thresholds)
        detected = time.perf_counter()
        objects = self.segment(segmenter, embedding, detections, query, config)
        timings.update({"detect": detected - started, "decode": timings["decode"] + time.perf_counter() - detected})
        return objects

    def exemplar_objects(
        self,
        image: FetchedImage,
        embedding: ImageEmbedding,
        exemplars: dict[str, list[tuple[Box, bool]]],
        config: ProjectConfig | None,
        timings: dict[str, float],
    ) -> list[DetectedObject]:
        """Every object like each label's exemplar boxes (SAM 3), with the label's first phrase when the exemplar
        control says exemplar="text"; SAM 3's own masks and scores, selected as a text prompt's objects."""
        config = self.config_of(config)
        detector = self.loaded()
        if not isinstance(detector, Sam3Detector):
            raise PromptError(f"exemplar boxes need SAM 3's detector: set DETECTOR=sam3 (it is {detector.name})", 422)
        thresholds = self.thresholds(config)
        started = time.perf_counter()
        picture: Picture = embedding
        if not detector.shares_encoder:
            picture = decode_image(image.data, self.settings.max_image_pixels)
        objects = []
        for label, boxes in exemplars.items():
            text = config.phrases.get(label, (label,))[0] if config.exemplar_text else None
            detections = detector.find_like(
                picture,
                [box for box, _ in boxes],
                [positive for _, positive in boxes],
                text,
                thresholds.box,
                thresholds.text,
                self.settings.max_objects,
            )
            objects += self.labelled(None, None, detections, [label] * len(detections), config)
        timings["exemplars"] = time.perf_counter() - started
        return objects

    @staticmethod
    def config_of(config: ProjectConfig | None) -> ProjectConfig:
        if config is None:
            raise PromptError("text prompts need the project's label config to name their labels", 422)
        return config

    def detect(
        self,
        detector: Detector,
        images: Sequence[Picture],
        query: TextQuery,
        thresholds: Thresholds,
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

    @staticmethod
    def segment(
        segmenter: Segmenter | None,
        embedding: ImageEmbedding | None,
        detections: list[Detection],
        query: TextQuery,
        config: ProjectConfig,
    ) -> list[DetectedObject]:
        """One object per box: SAM decodes every box of the image in one batched call (when the project has a
        BrushLabels or PolygonLabels control for its label); the object's score is the detector's box score times SAM's
        predicted IoU, so Label Studio can sort by either model's doubt. A detector that segments what it finds
        (SAM 3) brings each box's mask and score: no segmenter is asked."""
        return TextDetection.labelled(
            segmenter, embedding, detections, [query.labels[detection.phrase] for detection in detections], config
        )

    @staticmethod
    def labelled(
        segmenter: Segmenter | None,
        embedding: ImageEmbedding | None,
        detections: list[Detection],
        labels: list[str],
        config: ProjectConfig,
    ) -> list[DetectedObject]:
        """As `segment`, each detection with its label."""
        masked = [index for index, label in enumerate(labels) if label in config.mask_labels]
        predictions = {}
        unsegmented = [index for index in masked if detections[index].mask is None]
        if unsegmented and segmenter is not None and embedding is not None:
            prompts = [SegmentPrompt(box=detections[index].box) for index in unsegmented]
            predictions = dict(zip(unsegmented, segmenter.decode(embedding, prompts), strict=True))
        objects = []
        for index, (detection, label) in enumerate(zip(detections, labels, strict=True)):
            prediction = predictions.get(index)
            if prediction is not None:
                score = detection.score * iou_score(prediction.score)
                objects.append(DetectedObject(label, prediction.mask, score, detection.box))
            elif detection.mask is not None and index in masked:
                objects.append(DetectedObject(label, detection.mask, detection.score, detection.box))
            else:
                objects.append(DetectedObject(label, None, detection.score, detection.box))
        return objects
