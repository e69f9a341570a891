"""Label Studio result JSON for a task's prediction: SAM's masks as brushes (Label Studio's RLE) or polygons,
boxes as rectangles.

Which regions an object becomes depends on the controls that have its label: a BrushLabels control takes its mask
as a brush, a PolygonLabels control as polygons (MASK_REGIONS chooses when both have the label), and a
RectangleLabels control the detector's box, or, for a mask with no box (a click or a smart rectangle in a project
with rectangles alone), the tight box around the mask."""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from backend.config import Settings
from backend.errors import ConfigError
from backend.outcomes import DetectedObject, TaskPrediction
from backend.protocol.brush_rle import encode_mask
from backend.protocol.label_config import ProjectConfig
from backend.protocol.polygons import (
    Outline,
    PolygonRules,
    mask_outlines,
    percent_points,
    tight_box,
    within_task_budget,
)

log = logging.getLogger(__name__)


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


def polygon_result(
    outline: Outline, image_size: tuple[int, int], label: str, from_name: str, to_name: str, score: float
) -> dict:
    """A closed polygonlabels region from an outline in pixels; Label Studio wants percent of the image."""
    height, width = image_size
    return {
        "id": region_id(),
        "from_name": from_name,
        "to_name": to_name,
        "type": "polygonlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "readonly": False,
        "score": float(score),
        "value": {"points": percent_points(outline.points, image_size), "closed": True, "polygonlabels": [label]},
    }


@dataclass(frozen=True)
class RegionRules:
    """How a task's masks become regions."""

    mask_regions: str  # for a label both a PolygonLabels and a BrushLabels control have: polygon, brush or both
    polygons: PolygonRules
    # Of one task's answer as JSON (MAX_ANSWER_BYTES); None for the smart tools' answers, which become the annotator's
    # own regions rather than a stored prediction: every region asked for is answered.
    max_answer_bytes: int | None


def region_rules(settings: Settings, config: ProjectConfig) -> RegionRules:
    """The settings' rules, with the project's `<Number name="polygon_tolerance">` default when it has one."""
    tolerance = config.numbers.get("polygon_tolerance", settings.polygon_tolerance)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"polygon_tolerance must be a number of pixels, 0 or more, got {tolerance}")
    polygons = PolygonRules(
        tolerance, settings.polygon_min_area, settings.polygon_max_vertices, settings.polygon_max_task_vertices
    )
    return RegionRules(settings.mask_regions, polygons, settings.max_answer_bytes)


def _mask_kinds(obj: DetectedObject, config: ProjectConfig, rules: RegionRules) -> tuple[bool, bool]:
    """(as a brush, as polygons) for an object's mask."""
    brush = config.brush is not None and obj.label in config.brush.labels
    polygon = config.polygon is not None and obj.label in config.polygon.labels
    if brush and polygon and rules.mask_regions != "both":
        return rules.mask_regions == "brush", rules.mask_regions == "polygon"
    return brush, polygon


def task_results(prediction: TaskPrediction, config: ProjectConfig, model_version: str, rules: RegionRules) -> dict:
    """One entry of the /predict answer: per object, its mask as a brush and/or polygons (one per part, within the
    task's vertex cap), and a rectangle (its box, else the tight box around its mask) where the RectangleLabels
    control has its label."""
    kinds = [_mask_kinds(obj, config, rules) if obj.mask is not None else (False, False) for obj in prediction.objects]
    outlines = within_task_budget(
        [
            mask_outlines(obj.mask, rules.polygons) if polygon and obj.mask is not None else []
            for obj, (_, polygon) in zip(prediction.objects, kinds, strict=True)
        ],
        rules.polygons.max_task_vertices,
    )
    image = config.image_name
    regions = []
    for obj, (brush, polygon), parts in zip(prediction.objects, kinds, outlines, strict=True):
        if brush and obj.mask is not None and config.brush is not None:
            regions.append(brush_result(obj.mask, obj.label, config.brush.name, image, obj.score))
        if polygon and config.polygon is not None:
            name, size = config.polygon.name, prediction.image_size
            regions += [polygon_result(part, size, obj.label, name, image, obj.score) for part in parts]
        if config.rectangle is None or obj.label not in config.rectangle.labels:
            continue
        # A mask no brush or polygon shows is given as its tight box: rectangles are what the project draws.
        box = obj.box or (tight_box(obj.mask) if obj.mask is not None and not (brush or polygon) else None)
        if box is not None:
            regions.append(
                rectangle_result(box, prediction.image_size, obj.label, config.rectangle.name, image, obj.score)
            )
    scores = [obj.score for obj in prediction.objects]
    return {"result": regions, "score": float(min(scores)) if scores else 0.0, "model_version": model_version}


def task_answer(
    prediction: TaskPrediction, config: ProjectConfig, model_version: str, rules: RegionRules
) -> TaskAnswer:
    """`task_results` with the prediction's cache state and timings, the encoding's own time included."""
    started = time.perf_counter()
    entry = within_answer_bytes(
        task_results(prediction, config, prediction.model_version or model_version, rules), rules
    )
    timings = {**prediction.timings, "results": time.perf_counter() - started}
    return TaskAnswer(entry, prediction.cache_hit, timings)


def within_answer_bytes(entry: dict, rules: RegionRules) -> dict:
    """The answer with the regions of its least confident objects left out until its JSON fits MAX_ANSWER_BYTES
    (Label Studio stores it whole, and every annotator opening the task downloads it); logged, saying why."""
    if rules.max_answer_bytes is None:
        return entry
    size = len(json.dumps(entry))
    if size <= rules.max_answer_bytes:
        return entry
    regions = sorted(entry["result"], key=lambda region: region["score"], reverse=True)
    kept_bytes = size
    while regions and kept_bytes > rules.max_answer_bytes:
        left_out = regions[-1]["score"]
        while regions and regions[-1]["score"] == left_out:  # the object's every region: brush, polygons, rectangle
            kept_bytes -= len(json.dumps(regions.pop())) + 2  # the region and its separator
    log.warning(
        "a task's answer took %d bytes, more than MAX_ANSWER_BYTES (%d): %d of its %d regions are kept, the least "
        "confident left out (ragged masks cost most as brushes: a PolygonLabels control or a higher MAX_ANSWER_BYTES "
        "keeps them)",
        size,
        rules.max_answer_bytes,
        len(regions),
        len(entry["result"]),
    )
    kept = {id(region) for region in regions}
    score = min((region["score"] for region in regions), default=0.0)  # the task's score is its objects' least
    return {**entry, "result": [region for region in entry["result"] if id(region) in kept], "score": score}
