"""Synthetic segmentation data: one shape with a clear boundary on a textured background, and its mask.

Used by the learning test and bench/finetune.py, so both measure the same thing."""

from __future__ import annotations

import numpy as np


def textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Stripes at a random angle plus noise: texture everywhere, so edges are not the only signal."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 16)
    stripes = 0.5 + 0.5 * np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period)
    base = rng.uniform(40, 200, 3)
    image = base * (0.7 + 0.3 * stripes[..., None]) + rng.normal(0, 12, (height, width, 3))
    return np.clip(image, 0, 255)


def shape_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An ellipse, a rectangle or a triangle covering 3 % to 30 % of the image."""
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    rx, ry = rng.uniform(0.12, 0.28) * width, rng.uniform(0.12, 0.28) * height
    kind = rng.integers(3)
    if kind == 0:
        return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
    if kind == 1:
        return (np.abs(xs - cx) <= rx) & (np.abs(ys - cy) <= ry)
    # A triangle with its apex up: below the apex, within lines widening towards the base.
    depth = (ys - (cy - ry)) / (2 * ry)
    return (depth >= 0) & (depth <= 1) & (np.abs(xs - cx) <= depth * rx)


def shape_image(seed: int, height: int = 192, width: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 image and the bool mask of its shape, filled in a colour far from the background's."""
    rng = np.random.default_rng(seed)
    image = textured_background(rng, height, width)
    mask = shape_mask(rng, height, width)
    colour = 255 - image[mask].mean(0) + rng.normal(0, 6, (int(mask.sum()), 3))
    image[mask] = colour
    return np.clip(image, 0, 255).astype(np.uint8), mask


def shape_images(seeds: range, height: int = 192, width: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
    return [shape_image(seed, height, width) for seed in seeds]
