"""Detectors' precision and recall on a project's annotations: each image's detections matched to the tight boxes
of its annotated masks, label by label, greedily at box IoU >= MATCH_IOU, as detection benchmarks count them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from backend.outcomes import box_iou

MATCH_IOU = 0.5

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


@dataclass
class LabelCounts:
    true_positives: int = 0
    false_positives: int = 0
    missed: int = 0

    def add(self, other: LabelCounts) -> None:
        self.true_positives += other.true_positives
        self.false_positives += other.false_positives
        self.missed += other.missed

    def as_dict(self) -> dict:
        found = self.true_positives + self.false_positives
        present = self.true_positives + self.missed
        return {
            # None where nothing was detected (precision) or nothing is there to find (recall): no ratio to give.
            "precision": round(self.true_positives / found, 4) if found else None,
            "recall": round(self.true_positives / present, 4) if present else None,
            "true_positives": self.true_positives,
            "false_positives": self.false_positives,
            "missed": self.missed,
        }


def match_boxes(
    truth: Sequence[tuple[str, Box]], detected: Sequence[tuple[str, Box, float]], min_iou: float = MATCH_IOU
) -> dict[str, LabelCounts]:
    """Per label, the detections that found a true box (a true positive each), those that found none (false
    positives) and the true boxes no detection found (missed). Detections go most confident first; each takes the
    unmatched true box of its label it overlaps most, if that overlap reaches `min_iou`."""
    counts = {label: LabelCounts() for label in [*(label for label, _ in truth), *(label for label, _, _ in detected)]}
    unmatched = set(range(len(truth)))
    for label, box, _ in sorted(detected, key=lambda detection: -detection[2]):
        candidates = [(box_iou(box, truth[index][1]), index) for index in unmatched if truth[index][0] == label]
        best = max(candidates, default=(0.0, -1))
        if best[0] >= min_iou:
            unmatched.discard(best[1])
            counts[label].true_positives += 1
        else:
            counts[label].false_positives += 1
    for index in unmatched:
        counts[truth[index][0]].missed += 1
    return counts


@dataclass
class DetectorReport:
    """What one detector found of the project's labels over the evaluated images."""

    model: str
    labels: dict[str, LabelCounts] = field(default_factory=dict)

    def add(self, image: dict[str, LabelCounts]) -> None:
        for label, counts in image.items():
            self.labels.setdefault(label, LabelCounts()).add(counts)

    def as_dict(self) -> dict:
        overall = LabelCounts()
        for counts in self.labels.values():
            overall.add(counts)
        return {
            "model": self.model,
            "match_iou": MATCH_IOU,
            "overall": overall.as_dict(),
            "labels": {label: self.labels[label].as_dict() for label in sorted(self.labels)},
        }
