"""Detectors from Hugging Face transformers: GroundingDINO and MM-GroundingDINO (the same architecture as
groundingdino-py's, maintained, no compiled extension) and OWLv2.

Each is read from a folder in `save_pretrained`'s layout (the official repository's files, which `python -m backend
weights download` fetches at a pinned revision): nothing is fetched here. The images and text go through the
model's own processor, so what the model sees is what transformers' own pipeline would give it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import abstractmethod
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from backend.errors import WrongCheckpoint
from backend.models.checkpoints import sha256_of
from backend.models.detector import BoxScores, Detector, Picture, normalised_to_pixels, tokens_of_phrases
from backend.models.grounding_dino import MAX_SIZE_PER_SHORT_SIDE
from backend.models.sam import resolve_device

log = logging.getLogger(__name__)


class TransformersDetector(Detector):
    """A transformers model and its processor."""

    def __init__(self, model: Any, processor: Any, device: torch.device, identity: str) -> None:
        super().__init__()
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.identity = identity
        self.max_text_tokens = self.text_limit(model.config)

    @staticmethod
    @abstractmethod
    def text_limit(config: Any) -> int:
        """The most tokens the model's configuration lets it read."""


class TransformersGroundingDino(TransformersDetector):
    """`GroundingDinoForObjectDetection` or `MMGroundingDinoForObjectDetection` with `GroundingDinoProcessor`."""

    name = "GroundingDINO"

    @staticmethod
    def text_limit(config: Any) -> int:
        return config.max_text_len

    def text_tokens(self, caption: str, spans: list[tuple[int, int]]) -> int:
        return len(self.processor.tokenizer(caption)["input_ids"])

    def phrase_tokens(self, caption: str, spans: list[tuple[int, int]]) -> torch.Tensor:
        offsets = self.processor.tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
        return tokens_of_phrases(offsets, spans).to(self.device)

    def score(
        self, images: list[np.ndarray], caption: str, spans: list[tuple[int, int]], floor: float
    ) -> list[BoxScores]:
        pictures = [Image.fromarray(image) for image in images]
        inputs = self.processor(images=pictures, text=[caption] * len(images), return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        return [
            BoxScores(logits.float(), normalised_to_pixels(boxes.float(), image.shape[:2]))
            for image, logits, boxes in zip(images, outputs.logits, outputs.pred_boxes, strict=True)
        ]


class Owlv2Detector(TransformersDetector):
    """`Owlv2ForObjectDetection` with `Owlv2Processor`: every phrase is its own text query, so a box's "tokens"
    are the phrases and each phrase is its one token."""

    name = "OWLv2"

    @staticmethod
    def text_limit(config: Any) -> int:
        return config.text_config.max_position_embeddings

    def text_tokens(self, caption: str, spans: list[tuple[int, int]]) -> int:
        return max(len(self.processor.tokenizer(caption[start:end])["input_ids"]) for start, end in spans)

    def phrase_tokens(self, caption: str, spans: list[tuple[int, int]]) -> torch.Tensor:
        return torch.eye(len(spans), dtype=torch.bool, device=self.device)

    def batch_key(self, image: Picture) -> Hashable:
        """One for every image: the processor pads each image to its own square and resizes that to the model's
        fixed size, so a batch holds no padding that another image brought."""
        return None

    def score(
        self, images: list[np.ndarray], caption: str, spans: list[tuple[int, int]], floor: float
    ) -> list[BoxScores]:
        phrases = [caption[start:end] for start, end in spans]
        pictures = [Image.fromarray(image) for image in images]
        inputs = self.processor(images=pictures, text=[phrases] * len(images), return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        answers = []
        for image, logits, boxes in zip(images, outputs.logits, outputs.pred_boxes, strict=True):
            # OWLv2 pads each image to a square below and to the right: its boxes are relative to that square.
            side = max(image.shape[:2])
            answers.append(BoxScores(logits.float(), normalised_to_pixels(boxes.float(), (side, side))))
        return answers


# DETECTOR value → (config.json's model_type, model class, processor class, detector class)
ARCHITECTURES: dict[str, tuple[str, str, str, type[TransformersDetector]]] = {
    "grounding-dino": (
        "grounding-dino",
        "GroundingDinoForObjectDetection",
        "GroundingDinoProcessor",
        TransformersGroundingDino,
    ),
    "mm-grounding-dino": (
        "mm-grounding-dino",
        "MMGroundingDinoForObjectDetection",
        "GroundingDinoProcessor",
        TransformersGroundingDino,
    ),
    "owlv2": ("owlv2", "Owlv2ForObjectDetection", "Owlv2Processor", Owlv2Detector),
}


def load_transformers_detector(kind: str, folder: Path, device: str = "auto", image_size: int = 800) -> Detector:
    """The `kind` detector (a key of ARCHITECTURES) saved in `folder`; GroundingDINO's read images at `image_size`
    on their short side (OWLv2's size is fixed by its processor)."""
    import transformers

    model_type, model_class, processor_class, detector_class = ARCHITECTURES[kind]
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise WrongCheckpoint(f"{folder} holds no config.json: DETECTOR_MODEL must be a folder saved by transformers")
    found_type = json.loads(config_file.read_text()).get("model_type")
    if found_type != model_type:
        raise WrongCheckpoint(f"{folder} holds a {found_type!r} model; DETECTOR={kind} reads {model_type!r} models")
    # The torchvision image processors (transformers 4 called them the fast ones): the PIL OWLv2 one needs scipy.
    processor = getattr(transformers, processor_class).from_pretrained(
        folder, local_files_only=True, backend="torchvision"
    )
    if kind != "owlv2":
        processor.image_processor.size = {
            "shortest_edge": image_size,
            "longest_edge": round(image_size * MAX_SIZE_PER_SHORT_SIDE),
        }
    model = getattr(transformers, model_class).from_pretrained(folder, local_files_only=True)
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    made_of = [kind, config_file.read_text(), [sha256_of(path) for path in weights], image_size]
    identity = f"{kind}-" + hashlib.sha256(repr(made_of).encode()).hexdigest()[:16]
    log.info("loaded %s %s from %s", detector_class.name, identity, folder)
    return detector_class(model, processor, resolve_device(device), identity)
