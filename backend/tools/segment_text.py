"""One image and a typed prompt → labelled masks and an overlay picture, for the CLI's `predict` and the demo app.

Both go through the backend's own Predictor (same models, same embedding cache, same text-prompt code as
Label Studio's requests); each phrase of the prompt is its own label, as in lang-segment-anything.
"""

from __future__ import annotations

import imgviz
import numpy as np

from backend.errors import PromptError
from backend.images import FetchedImage, decode_image
from backend.inference.local import Predictor
from backend.outcomes import TaskPrediction
from backend.prompts.text import SEPARATORS, normalise_phrase
from backend.protocol.label_config import Control, ProjectConfig

IMAGE_NAME = "image"


def prompt_config(text: str, box_threshold: float, text_threshold: float) -> ProjectConfig:
    """A project whose labels are the prompt's phrases and whose thresholds are the given ones."""
    labels = tuple(dict.fromkeys(normalise_phrase(part) for part in SEPARATORS.split(text) if normalise_phrase(part)))
    if not labels:
        raise PromptError("the text prompt is empty or holds only separators; type words such as 'car, wheel'", 422)
    return ProjectConfig(
        image_name=IMAGE_NAME,
        image_field=IMAGE_NAME,
        brush=Control("masks", IMAGE_NAME, labels),
        rectangle=Control("boxes", IMAGE_NAME, labels),
        polygon=None,
        keypoint=None,
        text_prompt=None,
        phrases={label: (label,) for label in labels},
        numbers={"box_threshold": box_threshold, "text_threshold": text_threshold},
    )


def segment_text(
    predictor: Predictor, image: FetchedImage, text: str, box_threshold: float, text_threshold: float
) -> TaskPrediction:
    """Every object the prompt names in the image, each with its mask, box, label and score."""
    return predictor.predict_text(image, [text], prompt_config(text, box_threshold, text_threshold))


def detections_json(prediction: TaskPrediction) -> dict:
    height, width = prediction.image_size
    return {
        "width": width,
        "height": height,
        "embedding_cache": "hit" if prediction.cache_hit else "miss",
        "seconds": {name: round(seconds, 3) for name, seconds in prediction.timings.items()},
        "objects": [
            {
                "label": obj.label,
                "score": round(obj.score, 4),
                "box": [round(value, 1) for value in obj.box] if obj.box else None,
                "mask_pixels": int(obj.mask.sum()) if obj.mask is not None else None,
            }
            for obj in prediction.objects
        ],
    }


def overlay(image: FetchedImage, prediction: TaskPrediction, max_pixels: int) -> np.ndarray:
    """The image with each object's mask, box and "label score" caption drawn over it."""
    pixels = decode_image(image.data, max_pixels)
    if not prediction.objects:
        return pixels
    names = list(dict.fromkeys(obj.label for obj in prediction.objects))
    empty = np.zeros(pixels.shape[:2], dtype=bool)
    boxes = [obj.box or (0.0, 0.0, float(pixels.shape[1]), float(pixels.shape[0])) for obj in prediction.objects]
    return imgviz.instances2rgb(
        pixels,
        labels=[names.index(obj.label) + 1 for obj in prediction.objects],
        bboxes=[(y0, x0, y1, x1) for x0, y0, x1, y1 in boxes],
        masks=np.stack([obj.mask if obj.mask is not None else empty for obj in prediction.objects]),
        captions=[f"{obj.label} {obj.score:.2f}" for obj in prediction.objects],
        font_size=max(12, min(pixels.shape[:2]) // 40),
        line_width=2,
    )
