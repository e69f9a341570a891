"""The configured detector (DETECTOR) on each evaluated annotation's image, for `python -m backend evaluate`: the
labels the project's annotations carry as the caption, at BOX_THRESHOLD and TEXT_THRESHOLD, its boxes counted against
the tight boxes of the annotation's masks (`detection_scores`).

The training set keeps each region's label but not the project's label config, so a label's predicted_values
phrases and the config's own `<Number name="box_threshold">` defaults, which pre-annotation would read, are not
applied here."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from backend.config import Settings
from backend.errors import CheckpointMissing, PromptError
from backend.models.detector import Detector
from backend.models.registry import detector_weights, load_detector
from backend.prompts.text import TextQuery, Thresholds, build_query
from backend.protocol.polygons import tight_box
from backend.training.dataset import Region
from backend.training.detection_scores import LabelCounts, match_boxes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotationDetector:
    """The loaded detector with the project's caption and the thresholds it detects at."""

    detector: Detector
    query: TextQuery
    thresholds: Thresholds
    max_objects: int
    batch_size: int

    @property
    def identity(self) -> list:
        """What its counts depend on besides the images and masks, for resuming."""
        return [self.detector.identity, self.query.caption, self.thresholds.box, self.thresholds.text, self.max_objects]

    def counts(self, pixels: np.ndarray, regions: Sequence[Region]) -> dict[str, LabelCounts]:
        """Per label, what the detector found of the regions' boxes in the image."""
        (detections,) = self.detector.detect(
            [pixels],
            self.query.caption,
            list(self.query.spans),
            self.query.label_groups,
            self.thresholds.box,
            self.thresholds.text,
            self.max_objects,
            self.batch_size,
        )
        found = [(self.query.labels[detection.phrase], detection.box, detection.score) for detection in detections]
        truth = []
        for region in regions:
            box = tight_box(region.mask) if region.shape == pixels.shape[:2] else None
            if box is not None:
                truth.append((region.label, box))
        return match_boxes(truth, found)


def project_detector(settings: Settings, labels: Sequence[str], project_id: int) -> AnnotationDetector | None:
    """The configured detector, loaded, when its weights are present; None (and a log line saying why) when they
    are not, or when it cannot read the project's labels in one caption."""
    try:
        absent = [str(location.path) for location in detector_weights(settings) if not location.path.exists()]
    except CheckpointMissing as error:
        absent = [str(error)]
    if absent:
        log.info("project %d: no detector in the evaluation, its weights are absent: %s", project_id, ", ".join(absent))
        return None
    try:
        query = build_query([(label, label) for label in labels])
    except PromptError as error:
        log.warning("project %d: no detector in the evaluation: %s", project_id, error)
        return None
    detector = load_detector(settings)
    tokens = detector.text_tokens(query.caption, list(query.spans))
    if tokens > detector.max_text_tokens:
        log.warning(
            "project %d: no detector in the evaluation: its %d labels take %d tokens, %s reads at most %d",
            project_id,
            len(labels),
            tokens,
            detector.name,
            detector.max_text_tokens,
        )
        return None
    thresholds = Thresholds(settings.box_threshold, settings.text_threshold)
    return AnnotationDetector(detector, query, thresholds, settings.max_objects, settings.grounding_dino_batch)
