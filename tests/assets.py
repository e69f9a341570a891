"""Test material that needs no pytest, shared by the suite and the benchmarks: the tests' small SAM, synthetic
images with clean objects, and the recorded Label Studio 1.23.2 payloads (tests/fixtures/ls-protocol)."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from segment_anything.build_sam import _build_sam

from backend.cache.embeddings import serialize_embedding
from backend.config import Settings
from backend.models.registry import MODEL_BUILD_LOCK, load_segmenter
from backend.protocol.brush_rle import decode_mask

REPO = Path(__file__).resolve().parents[1]
PROTOCOL_DIR = REPO / "tests" / "fixtures" / "ls-protocol"


def build_small_sam(seed: int = 0) -> torch.nn.Module:
    """The real SAM architecture with a reduced image encoder (the prompt encoder and mask decoder are
    full size), random weights."""
    torch.manual_seed(seed)
    with MODEL_BUILD_LOCK:  # see MODEL_BUILD_LOCK: a model loading on another thread would leave these empty
        return _build_sam(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])


def smooth_object_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A gradient background with a few filled shapes: objects with clean boundaries."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), np.full_like(xs, 90)], -1)
    for _ in range(3):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        rx, ry = rng.uniform(0.08, 0.2) * width, rng.uniform(0.08, 0.2) * height
        inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
        image[inside] = rng.integers(0, 255, 3)
    return image.astype(np.uint8)


def encode(image: np.ndarray, fmt: str = "JPEG", exif_orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(image)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    picture.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def recorded(name: str) -> dict:
    """What Label Studio 1.23 sent in the recorded file `name` (a deep copy, safe to edit)."""
    with open(PROTOCOL_DIR / name) as handle:
        return copy.deepcopy(json.load(handle)["label_studio_sent"]["json"])


def encodes_logged(records: list) -> int:
    """Images the encoder ran on, from the embedding cache's one log line per encoded image (pytest's caplog)."""
    return sum(
        record.name == "backend.cache.embeddings" and "encoded image" in record.getMessage() for record in records
    )


def decode_brush(result: dict) -> np.ndarray:
    """The (H, W) bool mask of a brushlabels result, as Label Studio would draw it."""
    return decode_mask(result["value"]["rle"], result["original_height"], result["original_width"])


def cached_embedding_bytes(settings: Settings, height: int, width: int) -> int:
    """What the cache stores for an image of height × width encoded by `settings`' segmenter: the reduced-size SAM
    gives the official one's 256×64×64 features, so the same bytes as ViT-B/L/H (the figure the docs quote)."""
    embedding = load_segmenter(settings).encode(np.zeros((height, width, 3), np.uint8))
    return len(serialize_embedding(embedding))
