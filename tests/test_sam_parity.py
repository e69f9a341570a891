"""Where a click lands decides where the mask goes: for the same checkpoint, image and pixel prompts, the masks the
backend answers through /predict (its float16 embedding cache and its decoder included) are segment_anything's own
SamPredictor masks."""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from segment_anything import SamPredictor

from backend.models.sam_decoder import OnnxDecoder, TorchDecoder
from tests.assets import build_small_sam, decode_brush, encode, recorded, smooth_object_image
from tests.conftest import make_client

EXIF_ROTATED = "upload/1/parity_480x320_exif6.jpg"  # stored 480 wide; EXIF orientation 6 shows it 320 wide, 480 high
IMAGES = ["upload/1/e0d87ad7-car_640x480.jpg", EXIF_ROTATED]
MIN_IOU = 0.95  # the backend decodes from float16 features, the reference from float32


@dataclass(frozen=True)
class Prompt:
    name: str
    points: tuple[tuple[float, float, int], ...] = ()  # (x, y) as fractions of the width and height; 1 positive
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 as fractions of the width and height


SINGLE_CLICKS = [
    Prompt("click upper left", ((0.25, 0.3, 1),)),
    Prompt("click lower right", ((0.75, 0.7, 1),)),
    Prompt("click lower left", ((0.3, 0.8, 1),)),
]
PROMPTS = [
    *SINGLE_CLICKS,
    Prompt("two clicks and a negative", ((0.25, 0.3, 1), (0.6, 0.4, 1), (0.8, 0.8, 0))),
    Prompt("box", box=(0.2, 0.25, 0.7, 0.75)),
]


@pytest.fixture(scope="module")
def exif_rotated_jpeg(media_root: Path) -> None:
    (media_root / EXIF_ROTATED).write_bytes(encode(smooth_object_image(480, 320, 7), "JPEG", exif_orientation=6))


def upright_pixels(path: Path) -> np.ndarray:
    """The image as browsers show it (EXIF orientation applied), decoded here without the backend's code."""
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def label_studio_context(prompt: Prompt) -> dict:
    """The regions Label Studio sends for the prompt: percent of the image."""
    if prompt.box is not None:
        x0, y0, x1, y1 = (100 * fraction for fraction in prompt.box)
        value = {"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0, "rotation": 0, "rectanglelabels": ["Car"]}
        return {"result": [{"type": "rectanglelabels", "from_name": "tag3", "to_name": "image", "value": value}]}
    return {
        "result": [
            {
                "type": "keypointlabels",
                "from_name": "tag2",
                "to_name": "image",
                "is_positive": bool(positive),
                "value": {"x": 100 * x, "y": 100 * y, "width": 0.6, "keypointlabels": ["Car"]},
            }
            for x, y, positive in prompt.points
        ]
    }


def reference_mask(predictor: SamPredictor, prompt: Prompt, width: int, height: int) -> np.ndarray:
    points = np.array([(x * width, y * height) for x, y, _ in prompt.points]) if prompt.points else None
    labels = np.array([positive for _, _, positive in prompt.points]) if prompt.points else None
    box = np.array(prompt.box) * [width, height, width, height] if prompt.box is not None else None
    # As SAM's ONNX wrapper, which the backend runs: one click alone, or a box alone, keeps the best of SAM's three
    # masks by predicted IoU; more prompts take SAM's single mask.
    best_of_three = (len(prompt.points) == 1 and box is None) or (not prompt.points and box is not None)
    masks, scores, _ = predictor.predict(points, labels, box, multimask_output=best_of_three)
    return masks[int(np.argmax(scores))]


@pytest.mark.parametrize("image_size", [(480, 640), (480, 320), (100, 200)])
def test_the_onnx_decoder_upscales_masks_as_pytorch_for_every_image_shape(sam_checkpoint, image_size):
    # The ONNX graph is exported with a 480x640 example; it used to crop every image's mask as that one's.
    sam = build_small_sam()
    sam.load_state_dict(torch.load(sam_checkpoint))
    rng = np.random.default_rng(0)
    inputs = (
        rng.standard_normal((1, 256, 64, 64)).astype(np.float32),
        np.array([[[300.0, 500.0], [0.0, 0.0]]], np.float32),
        np.array([[1.0, -1.0]], np.float32),
        np.zeros((1, 1, 256, 256), np.float32),
        np.zeros(1, np.float32),
        np.array(image_size, np.float32),
    )
    onnx_masks, _, _ = OnnxDecoder(sam, 1).run(*inputs)
    torch_masks, _, _ = TorchDecoder(sam, torch.device("cpu")).run(*inputs)
    assert onnx_masks.shape == torch_masks.shape == (1, 1, *image_size)
    assert np.abs(onnx_masks - torch_masks).max() < 1e-3


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.parametrize("image", IMAGES)
def test_backend_masks_are_sam_predictor_masks_for_the_same_pixel_prompts(
    settings, redis_url, sam_checkpoint, media_root, exif_rotated_jpeg, image
):
    client, _ = make_client(replace(settings, redis_url=redis_url))
    pixels = upright_pixels(media_root / image)
    height, width = pixels.shape[:2]
    sam = build_small_sam()
    sam.load_state_dict(torch.load(sam_checkpoint))
    reference = SamPredictor(sam.eval())
    reference.set_image(pixels)
    expected, answered = {}, {}
    for task_id, prompt in enumerate(PROMPTS, start=1):
        body = recorded("04-predict-interactive-keypoints.json")
        # One task per prompt: a task's earlier clicks and boxes would otherwise refine this prompt's mask.
        body["tasks"][0].update(id=task_id, data={"image": f"/data/{image}"})
        body["params"]["context"] = label_studio_context(prompt)
        response = client.post("/predict", json=body)
        assert response.status_code == 200, response.json
        (result,) = response.json["results"][0]["result"]
        answered[prompt.name] = decode_brush(result)
        expected[prompt.name] = reference_mask(reference, prompt, width, height)
        assert answered[prompt.name].shape == (height, width)
        assert iou(answered[prompt.name], expected[prompt.name]) >= MIN_IOU, prompt.name
    # The masks of clicks in different places differ, and where they do, each answer sides with its own click.
    for this, other in permutations(SINGLE_CLICKS, 2):
        differ = expected[this.name] != expected[other.name]
        assert differ.mean() > 0.02, (this.name, other.name)
        agreement = np.mean(answered[this.name][differ] == expected[this.name][differ])
        assert agreement >= MIN_IOU, (this.name, other.name, agreement)
