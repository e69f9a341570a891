"""A simulated annotator scoring segmenters on a project's own annotations (`python -m backend evaluate`).

The protocol of the interactive-segmentation literature (NoC@85/90): the first click at the point of the true mask
farthest from its boundary; each next click at the point farthest from the boundary of the largest error region,
positive where the mask missed the object, negative where it spilled over; every click goes to the segmenter with
the clicks before it and the previous mask's low-resolution logits, as the smart tools send them. Per model it reports
the mean IoU after 1, 3 and 5 clicks, the mean number of clicks to reach 85 % and 90 % IoU (MAX_CLICKS when never
reached, as the literature caps it), the IoU of the mask's box alone, and the median time of a warm click (one
decode) and of one image's encode on this machine. A model is the configured segmenter or one of the project's
fine-tuned versions; the masks are the project's training set, held-out tasks first.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from backend.models.base import ImageEmbedding, Segmenter, SegmentPrompt
from backend.protocol.polygons import tight_box

MAX_CLICKS = 20
REPORTED_CLICKS = (1, 3, 5)
TARGETS = (0.85, 0.90)
CLICKS = range(1, MAX_CLICKS + 1)
CURVE_KEY = "miou_by_clicks"  # the report's mean IoU after each number of clicks, 1 to MAX_CLICKS


@dataclass(frozen=True)
class Click:
    x: int
    y: int
    positive: bool


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two (H, W) bool masks; 0 when the truth is empty (nothing to find)."""
    union = np.logical_or(predicted, truth).sum()
    if not truth.any() or union == 0:
        return 0.0
    return float(np.logical_and(predicted, truth).sum() / union)


def farthest_from_boundary(region: np.ndarray) -> tuple[int, int]:
    """(x, y) of the region's pixel farthest from its boundary, the image's edge counting as boundary; of several as
    far, the one nearest their centre (in a rectangle, a whole row or column of pixels is as far)."""
    padded = np.pad(region.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    rows, columns = np.nonzero(distance == distance.max())
    nearest = int(np.argmin((rows - rows.mean()) ** 2 + (columns - columns.mean()) ** 2))
    return int(columns[nearest]), int(rows[nearest])


def next_click(truth: np.ndarray, predicted: np.ndarray | None) -> Click | None:
    """Where the simulated annotator clicks next; None when the mask is already the truth."""
    if predicted is None:
        return Click(*farthest_from_boundary(truth), positive=True)
    largest: tuple[int, np.ndarray, bool] | None = None
    for errors, positive in ((truth & ~predicted, True), (predicted & ~truth, False)):
        count, labels, stats, _ = cv2.connectedComponentsWithStats(errors.astype(np.uint8), connectivity=8)
        if count < 2:
            continue
        component = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        area = int(stats[component, cv2.CC_STAT_AREA])
        if largest is None or area > largest[0]:
            largest = (area, labels == component, positive)
    if largest is None:
        return None
    return Click(*farthest_from_boundary(largest[1]), positive=largest[2])


@dataclass
class MaskScore:
    """One true mask's scores: IoU after each click (stopped once past every reported point), and from its box."""

    ious: list[float]
    box_iou: float

    def iou_after(self, clicks: int) -> float:
        return self.ious[min(clicks, len(self.ious)) - 1] if self.ious else 0.0

    def clicks_to(self, target: float) -> int:
        return next((index + 1 for index, iou in enumerate(self.ious) if iou >= target), MAX_CLICKS)


def score_mask(
    segmenter: Segmenter, embedding: ImageEmbedding, truth: np.ndarray, decode_seconds: list[float]
) -> MaskScore:
    """Click on `truth` as the simulated annotator does, until it reached the highest target after the last
    reported click count, the mask is perfect, or MAX_CLICKS; each decode's time is appended to `decode_seconds`."""
    box = tight_box(truth)  # as a rectangle drawn around it
    if box is None:  # an empty truth: nothing to find
        return MaskScore([0.0] * MAX_CLICKS, 0.0)
    points: list[tuple[float, float]] = []
    labels: list[int] = []
    predicted: np.ndarray | None = None
    logits: np.ndarray | None = None
    ious: list[float] = []
    while len(ious) < MAX_CLICKS and not (len(ious) >= max(REPORTED_CLICKS) and max(ious) >= max(TARGETS)):
        click = next_click(truth, predicted)
        if click is None:  # the mask is the truth: every later click would keep it
            ious += [1.0] * (max(REPORTED_CLICKS) - len(ious))
            break
        points.append((float(click.x), float(click.y)))
        labels.append(1 if click.positive else 0)
        started = time.perf_counter()
        (prediction,) = segmenter.decode(embedding, [SegmentPrompt(list(points), list(labels), mask_logits=logits)])
        decode_seconds.append(time.perf_counter() - started)
        predicted, logits = prediction.mask, prediction.low_res_logits
        ious.append(mask_iou(predicted, truth))
    (boxed,) = segmenter.decode(embedding, [SegmentPrompt(box=box)])
    return MaskScore(ious, mask_iou(boxed.mask, truth))


def iou_key(clicks: int) -> str:
    return f"miou_{clicks}_click{'s' if clicks > 1 else ''}"


def clicks_key(target: float) -> str:
    return f"clicks_to_{round(target * 100)}"


def _mean(values: list[float] | list[int]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


@dataclass
class ModelReport:
    """What one model scored over the evaluated masks."""

    model: str
    scores: list[MaskScore] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)
    encode_seconds: float | None = None

    def iou_curve(self) -> list[float]:
        """The mean IoU after 1, 2, ... MAX_CLICKS clicks; a mask the annotator stopped clicking on keeps its last
        IoU (as the literature's curves do), so every point averages every mask."""
        if not self.scores:
            return []
        return [round(float(np.mean([score.iou_after(clicks) for score in self.scores])), 4) for clicks in CLICKS]

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "masks": len(self.scores),
            **{
                iou_key(clicks): _mean([score.iou_after(clicks) for score in self.scores]) for clicks in REPORTED_CLICKS
            },
            **{clicks_key(target): _mean([score.clicks_to(target) for score in self.scores]) for target in TARGETS},
            CURVE_KEY: self.iou_curve(),
            "box_miou": _mean([score.box_iou for score in self.scores]),
            "warm_click_ms": round(statistics.median(self.decode_seconds) * 1000, 2) if self.decode_seconds else None,
            "encode_ms": round(self.encode_seconds * 1000, 1) if self.encode_seconds is not None else None,
        }


@dataclass
class ImageScores:
    """One annotation's masks scored by every model (in the models' order), with each model's decode times."""

    scores: list[list[MaskScore]]
    decode_seconds: list[list[float]]

    def as_dict(self) -> dict:
        return {
            "scores": [[[score.ious, score.box_iou] for score in model] for model in self.scores],
            "decode_seconds": self.decode_seconds,
        }

    @classmethod
    def of_dict(cls, data: dict) -> ImageScores:
        return cls(
            [[MaskScore(list(ious), float(box_iou)) for ious, box_iou in model] for model in data["scores"]],
            [list(seconds) for seconds in data["decode_seconds"]],
        )


def score_image(segmenters: Sequence[Segmenter], embedding: ImageEmbedding, masks: list[np.ndarray]) -> ImageScores:
    """Every model's scores on one image's true masks. Every model shares the configured image encoder (a version is
    a decoder), so the one embedding serves them all."""
    decode_seconds: list[list[float]] = [[] for _ in segmenters]
    scores = [
        [score_mask(segmenter, embedding, truth, seconds) for truth in masks]
        for segmenter, seconds in zip(segmenters, decode_seconds, strict=True)
    ]
    return ImageScores(scores, decode_seconds)


def time_encode(segmenter: Segmenter, pixels: np.ndarray) -> float:
    """Seconds of one encode of the image on this machine: one measurement serves every model, as they share it."""
    started = time.perf_counter()
    segmenter.encode(pixels)
    return time.perf_counter() - started


def model_reports(
    names: Sequence[str], images: Iterable[ImageScores], encode_seconds: float | None
) -> list[ModelReport]:
    """Each model's report over every scored image."""
    reports = [ModelReport(name, encode_seconds=encode_seconds) for name in names]
    for image in images:
        for report, scores, seconds in zip(reports, image.scores, image.decode_seconds, strict=True):
            report.scores += scores
            report.decode_seconds += seconds
    return reports


def markdown_table(reports: Sequence[ModelReport]) -> str:
    columns = [
        ("model", "model"),
        ("masks", "masks"),
        *((f"mIoU @{clicks}", iou_key(clicks)) for clicks in REPORTED_CLICKS),
        *((f"clicks to {round(target * 100)} %", clicks_key(target)) for target in TARGETS),
        ("box mIoU", "box_miou"),
        ("warm click ms", "warm_click_ms"),
        ("encode ms", "encode_ms"),
    ]
    rows = [report.as_dict() for report in reports]
    lines = [
        "| " + " | ".join(title for title, _ in columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join("" if row[key] is None else str(row[key]) for _, key in columns) + " |" for row in rows),
    ]
    return "\n".join(lines)
