"""Label Studio result JSON for a task's prediction: brush masks in Label Studio's RLE and rectangles."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from backend.outcomes import TaskPrediction
from backend.protocol.brush_rle import encode_mask
from backend.protocol.label_config import ProjectConfig


@dataclass
class TaskAnswer:
    """One task's entry of the /predict answer ("result" regions, "score", "model_version"), and how it was
    made: kilobytes of RLE where the prediction's full-size masks were megabytes, so it is what a batch keeps
    and what a queue worker sends back."""

    entry: dict
    cache_hit: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def region_id() -> str:
    return uuid.uuid4().hex[:10]


def brush_result(
    mask: np.ndarray, label: str, from_name: str, to_name: str, score: float, result_id: str | None = None
) -> dict:
    """A brushlabels region; `mask` is (H, W) bool at the size Label Studio shows the image."""
    height, width = mask.shape
    return {
        "id": result_id or region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": "brushlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "readonly": False,
        "score": float(score),
        "value": {"format": "rle", "rle": encode_mask(mask), "brushlabels": [label]},
    }


def rectangle_result(
    box: tuple[float, float, float, float],
    image_size: tuple[int, int],
    label: str,
    from_name: str,
    to_name: str,
    score: float,
    result_id: str | None = None,
) -> dict:
    """A rectanglelabels region from a pixel box; Label Studio wants percent of the image."""
    height, width = image_size
    x0, y0, x1, y1 = box
    return {
        "id": result_id or region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": "rectanglelabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "readonly": False,
        "score": float(score),
        "value": {
            "x": 100.0 * x0 / width,
            "y": 100.0 * y0 / height,
            "width": 100.0 * (x1 - x0) / width,
            "height": 100.0 * (y1 - y0) / height,
            "rotation": 0,
            "rectanglelabels": [label],
        },
    }


def task_results(prediction: TaskPrediction, config: ProjectConfig, model_version: str) -> dict:
    """One entry of the /predict answer: a brush region per object with a mask, a rectangle per object with a box
    whose label the RectangleLabels control has."""
    regions = []
    for obj in prediction.objects:
        if obj.mask is not None:
            brush = config.brush_for(obj.label)
            regions.append(brush_result(obj.mask, obj.label, brush.name, config.image_name, obj.score))
        if obj.box is not None and config.rectangle is not None and obj.label in config.rectangle.labels:
            regions.append(
                rectangle_result(
                    obj.box, prediction.image_size, obj.label, config.rectangle.name, config.image_name, obj.score
                )
            )
    scores = [obj.score for obj in prediction.objects]
    return {"result": regions, "score": float(min(scores)) if scores else 0.0, "model_version": model_version}


def task_answer(prediction: TaskPrediction, config: ProjectConfig, model_version: str) -> TaskAnswer:
    """`task_results` with the prediction's cache state and timings, the encoding's own time included."""
    started = time.perf_counter()
    entry = task_results(prediction, config, prediction.model_version or model_version)
    timings = {**prediction.timings, "results": time.perf_counter() - started}
    return TaskAnswer(entry, prediction.cache_hit, timings)
