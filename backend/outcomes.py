"""What a prediction produces, as plain data: the objects found in one task's image, before and after they
become Label Studio's JSON. Below every layer that makes or reads them, so none of those imports another."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def iou_score(predicted_iou: float) -> float:
    """SAM's predicted IoU as a score in 0-1, like GroundingDINO's: the decoder's head is unbounded (slightly
    negative for a poor mask), and Label Studio sorts tasks by the score."""
    return min(max(float(predicted_iou), 0.0), 1.0)


def box_iou(first: tuple[float, float, float, float], second: tuple[float, float, float, float]) -> float:
    """Intersection over union of two pixel boxes (x0, y0, x1, y1); 0 for boxes that do not overlap."""
    width = min(first[2], second[2]) - max(first[0], second[0])
    height = min(first[3], second[3]) - max(first[1], second[1])
    if width <= 0 or height <= 0:
        return 0.0
    overlap = width * height
    areas = (first[2] - first[0]) * (first[3] - first[1]) + (second[2] - second[0]) * (second[3] - second[1])
    return overlap / (areas - overlap)


@dataclass
class DetectedObject:
    label: str
    mask: np.ndarray | None  # (H, W) bool; None when the project only wants the box
    score: float
    box: tuple[float, float, float, float] | None = None  # pixel box, when the object came from one


@dataclass
class TaskPrediction:
    objects: list[DetectedObject]
    image_size: tuple[int, int]  # (height, width)
    cache_hit: bool
    timings: dict[str, float] = field(default_factory=dict)
    model_version: str = ""  # the decoder version that made the masks
