"""An evaluation's scores kept per annotation under MODEL_DIR/<project>/reports/, so that a run interrupted and
started again scores only the annotations it had not.

Kept in a folder named by a key of the models (names and weights) and the protocol's settings, and per annotation
with a digest of its image and masks: a changed model, setting or annotation is scored anew. The report's writing
removes them all.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from backend.project_files import write_atomically
from backend.training.dataset import AnnotationRecord
from backend.training.detection_scores import LabelCounts
from backend.training.evaluation import ImageScores

PARTIAL_PREFIX = ".partial-"


def run_key(models: Sequence[tuple[str, str]], settings: dict) -> str:
    """The key of a run: the (name, weights identity) of each model, in order, and the settings that change a score."""
    described = json.dumps({"models": [list(model) for model in models], **settings}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def record_digest(record: AnnotationRecord) -> str:
    """What an annotation's scores depend on: its image and each region's label and mask."""
    digest = hashlib.sha256(json.dumps([record.image_url, record.image_digest]).encode())
    for region in record.regions:
        digest.update(json.dumps([region.region_id, region.label, list(region.shape)]).encode())
        digest.update(region.bits.tobytes())
    return digest.hexdigest()


class Kept(NamedTuple):
    """One annotation's scores as a run kept them, with the encode time measured then."""

    scores: ImageScores
    encode_seconds: float
    detections: dict[str, LabelCounts] | None  # the detector's counts per label; None without a detector


class PartialScores:
    """The scores one run (`run_key`) has kept so far, one file per annotation."""

    def __init__(self, reports: Path, key: str) -> None:
        self.folder = reports / f"{PARTIAL_PREFIX}{key}"

    def _path(self, record: AnnotationRecord, model: str | None) -> Path:
        folder = self.folder / model if model else self.folder  # an installed model's own folder
        return folder / f"{record.annotation_id}.json"

    def get(self, record: AnnotationRecord, model: str | None = None) -> Kept | None:
        """The annotation's kept scores (by the configured encoder's models, or by one installed `model` on its own);
        None when not kept, or kept for another version of the annotation."""
        try:
            kept = json.loads(self._path(record, model).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:  # torn by a power loss (written without flushing): scored again
            return None
        if kept.get("record") != record_digest(record):
            return None
        detections = kept["detections"]
        return Kept(
            ImageScores.of_dict(kept),
            kept["encode_seconds"],
            None if detections is None else {label: LabelCounts(*counts) for label, counts in detections.items()},
        )

    def put(self, record: AnnotationRecord, kept: Kept, model: str | None = None) -> None:
        detections = kept.detections
        saved = {
            "record": record_digest(record),
            "encode_seconds": kept.encode_seconds,
            "detections": None
            if detections is None
            else {label: [c.true_positives, c.false_positives, c.missed] for label, c in detections.items()},
            **kept.scores.as_dict(),
        }
        # Not flushed: it only saves work, and a torn file reads as not kept.
        write_atomically(self._path(record, model), json.dumps(saved).encode(), durable=False)


def remove_partial_scores(reports: Path) -> None:
    """Every run's kept scores, this one's and those of runs with other models or settings, which none will resume."""
    for folder in reports.glob(f"{PARTIAL_PREFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)
