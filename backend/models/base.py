"""The one small interface every promptable segmenter implements: encode an image, decode prompts.

The protocol, prompt and cache layers only see these types, so another model (SAM 2, a lighter
encoder) plugs in by implementing `Segmenter` without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass
class ImageEmbedding:
    """An encoded image: the encoder's features plus the sizes needed to map prompts and masks."""

    features: np.ndarray  # (C, h, w), float16 or float32
    original_size: tuple[int, int]  # (height, width) of the image as Label Studio shows it
    input_size: tuple[int, int]  # (height, width) after resizing to the encoder's input
    # Further encoder outputs a model's decoder reads besides `features`, by name: SAM 2's high-resolution
    # feature maps, SAM-HQ's early ViT features. Cached with `features`, so a click never re-runs the encoder.
    extras: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class SegmentPrompt:
    """The prompts for one object, in pixel coordinates of the original image."""

    points: list[tuple[float, float]] = field(default_factory=list)  # (x, y)
    point_labels: list[int] = field(default_factory=list)  # 1 positive, 0 negative
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1
    mask_logits: np.ndarray | None = None  # (256, 256) low-resolution logits of an earlier mask

    def __post_init__(self) -> None:
        if len(self.points) != len(self.point_labels):
            raise ValueError("every point needs a label")
        if not self.points and self.box is None:
            raise ValueError("a prompt needs at least one point or a box")


@dataclass
class MaskPrediction:
    """One decoded object."""

    mask: np.ndarray  # (H, W) bool at the original image size
    score: float  # the model's predicted IoU
    low_res_logits: np.ndarray  # (256, 256) float32, reusable as the next mask prompt


def check_rgb_images(images: list[np.ndarray]) -> None:
    """ValueError unless every image is what `Segmenter.encode` takes: RGB uint8 (H, W, 3)."""
    if any(image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 for image in images):
        raise ValueError("encode expects RGB uint8 (H, W, 3) images")


class Segmenter(Protocol):
    """A promptable segmentation model."""

    @property
    def identity(self) -> str:
        """A stable name of the encoder weights: embeddings are cached under it."""

    def encode(self, image: np.ndarray) -> ImageEmbedding:
        """Encode an RGB uint8 (H, W, 3) image."""

    def encode_batch(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        """Encode several RGB uint8 images, of any sizes, in one pass of the encoder."""

    def decode(self, embedding: ImageEmbedding, prompts: list[SegmentPrompt]) -> list[MaskPrediction]:
        """Decode each prompt against the embedding into one mask."""


@runtime_checkable
class FineTunable(Segmenter, Protocol):
    """A segmenter whose prompt decoder active learning can fine-tune: a version stores its decoder weights as
    bytes, and serving builds the variant that shares this segmenter's image encoder (and so its cache)."""

    def with_decoder_weights(self, weights: bytes) -> Segmenter:
        """This segmenter with the given decoder weights; ValueError if they do not fit it."""
