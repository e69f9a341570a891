"""SAM's masks as Label Studio polygons, and polygons back to masks.

A part is a connected group of a mask's pixels (8-connected); each part of at least `min_area` pixels becomes one
polygon. Its outline is traced with OpenCV's `findContours` on the mask at twice its resolution, so it runs a
quarter pixel inside the part's edge (a single pixel is a small square, not a point), then simplified with
Douglas–Peucker (`approxPolyDP`) at a tolerance in pixels. Rasterising takes the pixels whose centre lies inside or
on a polygon (`fillPoly`), so the unsimplified outline gives its part back exactly; a part that the simplified
polygon would cover at an IoU under MIN_PART_IOU (a small or thin one, where a pixel of tolerance is much of it)
is simplified at half the tolerance, again until it does. Label Studio's polygons have no holes: only the outer
outline is kept, so a hole, and anything inside it, is filled.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)

SUBPIXEL_BITS = 4  # fillPoly's `shift`: vertices are placed to 1/16 of a pixel when a polygon is rasterised
PERCENT_DECIMALS = 4  # 0.0001 % of a 10,000-pixel side is 0.01 pixel; fewer digits keep the answer small
UPSAMPLE = 2  # outlines are traced on the mask at this many times its resolution
TOLERANCE_STEPS = 24  # changes of the tolerance tried before an outline is given up as too ragged
MIN_TOLERANCE = 1 / 16  # below this a polygon is not simplified: it already covers its part
MIN_PART_IOU = 0.95  # a polygon covers its part (holes filled) at least this well, or is simplified less


@dataclass(frozen=True)
class PolygonRules:
    """How masks become polygons: Douglas–Peucker tolerance (pixels), the smallest part kept (pixels), and the
    caps that keep a speckled mask from making a megabyte answer."""

    tolerance: float
    min_area: int
    max_vertices: int  # per polygon: a more ragged outline is simplified further until it fits
    max_task_vertices: int  # per task: the largest parts are kept first


@dataclass
class Outline:
    """One part's polygon in pixel coordinates (x, y as floats; pixel (0, 0) spans 0-1) and its area in pixels."""

    points: np.ndarray  # (N, 2) float, N >= 3
    area: int


def _fill(points: np.ndarray, shape: tuple[int, int], origin: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The (H, W) bool mask of a polygon in pixel coordinates (pixel (0, 0) spans 0-1), shifted by -`origin`:
    the pixels whose centre lies inside or on it, as OpenCV's fillPoly draws it (vertices to 1/16 of a pixel, an
    edge exactly between two pixel centres taking the pixel after it)."""
    centred = (np.asarray(points, dtype=np.float64) - origin - 0.5) * (1 << SUBPIXEL_BITS)
    mask = np.zeros(shape, dtype=np.uint8)
    cv2.fillPoly(mask, [np.round(centred).astype(np.int32).reshape(-1, 1, 2)], 1, cv2.LINE_8, SUBPIXEL_BITS)
    return mask.astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def _simplified(contour: np.ndarray, rules: PolygonRules) -> np.ndarray | None:
    """A traced outline (in doubled pixels) as a polygon in pixels: at `rules.tolerance`, lowered while the polygon
    covers its part at an IoU under MIN_PART_IOU or has under three vertices, raised while it has over
    `rules.max_vertices` vertices (the cap wins); None when no tolerance leaves three vertices or more within the cap.
    """
    exact = (contour.reshape(-1, 2) + 0.5) / UPSAMPLE
    x, y, width, height = cv2.boundingRect(contour)
    origin = (x // UPSAMPLE, y // UPSAMPLE)
    shape = (height // UPSAMPLE + 2, width // UPSAMPLE + 2)
    part = _fill(exact, shape, origin)
    tolerance, capped = rules.tolerance, False
    for _ in range(TOLERANCE_STEPS):
        # Douglas–Peucker keeps a subset of the outline's points, so the polygon stays inside the part's box.
        simplified = cv2.approxPolyDP(contour, tolerance * UPSAMPLE, True) if tolerance > 0 else contour
        points = (simplified.reshape(-1, 2) + 0.5) / UPSAMPLE
        if len(points) > rules.max_vertices:
            tolerance, capped = max(tolerance * 2, MIN_TOLERANCE), True
        elif (
            not capped
            and tolerance >= MIN_TOLERANCE
            and (len(points) < 3 or _iou(_fill(points, shape, origin), part) < MIN_PART_IOU)
        ):
            tolerance /= 2
        else:
            return points if len(points) >= 3 else None
    return None


def _part_area(contour: np.ndarray, labels: np.ndarray, areas: np.ndarray, origin: tuple[int, int]) -> int:
    """Pixels of the part a traced outline (in doubled pixels) goes round: the part of its first point."""
    x, y = contour[0, 0] // UPSAMPLE
    return int(areas[labels[y - origin[1], x - origin[0]]])


def mask_outlines(mask: np.ndarray, rules: PolygonRules) -> list[Outline]:
    """The outlines of a (H, W) bool mask's parts of at least `rules.min_area` pixels, largest first, until one
    would take the vertices over the task's cap."""
    box = tight_box(mask)
    if box is None:
        return []
    # Only the mask's box is labelled and traced: an object is usually a small part of its image.
    x0, y0, x1, y1 = (int(value) for value in box)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask[y0:y1, x0:x1].astype(np.uint8), connectivity=8)
    areas = stats[:, cv2.CC_STAT_AREA]
    large = areas >= max(rules.min_area, 1)
    large[0] = False  # component 0 is the background
    # Outer outlines only: a hole, and any part inside it, lies within its part's outline. Traced at twice the
    # resolution, an outline runs a quarter pixel inside the part's edge rather than through its edge pixels'
    # centres, so a pixel, or a line one pixel wide, still has an area.
    doubled = np.repeat(np.repeat(large[labels].astype(np.uint8), UPSAMPLE, axis=0), UPSAMPLE, axis=1)
    contours, _ = cv2.findContours(
        doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=(x0 * UPSAMPLE, y0 * UPSAMPLE)
    )
    # Largest first, and no more than the task's cap can hold: a speckled mask has thousands of parts.
    outlines: list[Outline] = []
    budget = rules.max_task_vertices
    sized = [(_part_area(contour, labels, areas, (x0, y0)), contour) for contour in contours]
    for area, contour in sorted(sized, key=lambda item: -item[0]):
        points = _simplified(contour, rules)
        if points is None:
            continue
        if len(points) > budget:
            break
        outlines.append(Outline(points, area))
        budget -= len(points)
    return outlines


def within_task_budget(outlines: list[list[Outline]], max_task_vertices: int) -> list[list[Outline]]:
    """Each object's outlines, keeping the task's largest parts first while their vertices fit the task's cap."""
    ranked = sorted(
        (
            (outline.area, index, position)
            for index, parts in enumerate(outlines)
            for position, outline in enumerate(parts)
        ),
        key=lambda item: -item[0],
    )
    kept: set[tuple[int, int]] = set()
    budget = max_task_vertices
    for _, index, position in ranked:
        vertices = len(outlines[index][position].points)
        if vertices <= budget:
            kept.add((index, position))
            budget -= vertices
    dropped = len(ranked) - len(kept)
    if dropped:
        log.info("%d polygons left out: the task's polygons would have over %d vertices", dropped, max_task_vertices)
    return [
        [outline for position, outline in enumerate(parts) if (index, position) in kept]
        for index, parts in enumerate(outlines)
    ]


def percent_points(points: np.ndarray, image_size: tuple[int, int]) -> list[list[float]]:
    """Pixel coordinates (pixel (0, 0) spans 0-1) as Label Studio's percent of the image's width and height."""
    height, width = image_size
    percent = points * (100.0 / width, 100.0 / height)
    return np.round(percent, PERCENT_DECIMALS).tolist()


def rasterise(points_percent: object, image_size: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool mask of a polygon given in percent of the image: the pixels whose centre lies inside or on
    it."""
    height, width = image_size
    return _fill(np.asarray(points_percent, dtype=np.float64) * (width / 100.0, height / 100.0), image_size)


def tight_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The pixel box (x0, y0, x1, y1) around a mask's pixels, edges included; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if not rows.size:
        return None
    columns = np.flatnonzero(mask.any(axis=0))
    return float(columns[0]), float(rows[0]), float(columns[-1] + 1), float(rows[-1] + 1)
