"""SAM 3 as the detector (`DETECTOR=sam3`): every instance of each phrase, found and segmented in one model.

transformers' `Sam3Model` reads one noun phrase at a time against an image and answers, for each of its queries, a
box, a mask and a score (the query's match times the phrase's presence in the image, as its processor's
`post_process_instance_segmentation` scores them). The image goes through the vision encoder once and every phrase
reuses its features, as the library's documentation does for several prompts. Each phrase is its own query, so, as
for OWLv2, a box's "tokens" are the phrases. Boxes and masks leave here as the processor would give them; the shared
selection (`detector.select`) keeps, de-duplicates and caps them as for every detector, and each kept box brings
its mask, so pre-annotation needs no segmenter pass.

On the folder `SAM_MODEL_TYPE=sam3` reads, the detector and the tracker share one ViT: the tracker's cached embedding
then carries the ViT's output (`SAM3_BACKBONE`) and the detector runs its own neck on it (`score_encoded`), so an
image is encoded once for clicks, text prompts and pre-annotation.

The folder is the official `facebook/sam3` (a `sam3_video` model, detector and tracker) or one saved by
`Sam3Model.save_pretrained`; the tokenizer's files must be beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert

from backend.errors import WrongCheckpoint
from backend.models.base import ImageEmbedding
from backend.models.checkpoints import sha256_of
from backend.models.detector import NMS_IOU, BoxScores, Detection, Picture, select, size_of
from backend.models.hf_segmenter import SAM3_BACKBONE
from backend.models.sam import resolve_device
from backend.models.transformers_detectors import TransformersDetector

log = logging.getLogger(__name__)

# Sam3Processor pads every phrase to 32 tokens, the text encoder's context.
SAM3_TEXT_TOKENS = 32
# config.json's model_type: the official repository's whole model, or the detector saved on its own.
SAM3_MODEL_TYPES = ("sam3_video", "sam3")


class Sam3Detector(TransformersDetector):
    """`Sam3Model` with `Sam3Processor`."""

    name = "SAM 3"
    makes_masks = True

    def __init__(
        self, model: Any, processor: Any, device: torch.device, identity: str, shares_encoder: bool = False
    ) -> None:
        super().__init__(model, processor, device, identity)
        self.shares_encoder = shares_encoder

    @staticmethod
    def text_limit(config: Any) -> int:
        return SAM3_TEXT_TOKENS

    def text_tokens(self, caption: str, spans: list[tuple[int, int]]) -> int:
        return max(len(self.processor.tokenizer(caption[start:end])["input_ids"]) for start, end in spans)

    def phrase_tokens(self, caption: str, spans: list[tuple[int, int]]) -> torch.Tensor:
        return torch.eye(len(spans), dtype=torch.bool, device=self.device)

    def batch_key(self, image: Picture) -> Hashable:
        """One for every image: the processor resizes each to the model's square input, with no padding."""
        return None

    def score(
        self, images: list[np.ndarray], caption: str, spans: list[tuple[int, int]], floor: float
    ) -> list[BoxScores]:
        phrases = self._phrases([caption[start:end] for start, end in spans])
        return [self._score_features(*self._vision(image), phrases, floor) for image in images]

    def score_encoded(
        self, embeddings: list[ImageEmbedding], caption: str, spans: list[tuple[int, int]], floor: float
    ) -> list[BoxScores]:
        """From the tracker's embeddings (their SAM3_BACKBONE): the detector's neck on the ViT's output, then as
        `score`."""
        phrases = self._phrases([caption[start:end] for start, end in spans])
        return [self._score_features(*self._vision(embedding), phrases, floor) for embedding in embeddings]

    def find_like(
        self,
        picture: Picture,
        exemplars: list[tuple[float, float, float, float]],
        positive: list[bool],
        text: str | None,
        box_threshold: float,
        text_threshold: float,
        max_objects: int,
        nms_iou: float = NMS_IOU,
    ) -> list[Detection]:
        """Every instance like the exemplar boxes (x0, y0, x1, y1 in the image's pixels; `positive` False for one
        that shows what is not wanted) in one image or the tracker's embedding of it, optionally narrowed by the
        noun phrase `text`; without it the phrase is "visual", as `Sam3Processor` prompts boxes alone. Boxes,
        scores and masks are those of `post_process_instance_segmentation`, then selected as a text prompt's (one
        phrase: thresholds, NMS, the object cap); every Detection's phrase is 0."""
        height, width = size_of(picture)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        normalised = torch.tensor(exemplars, dtype=torch.float32).reshape(-1, 4) / scale
        geometry = {
            "input_boxes": box_convert(normalised, "xyxy", "cxcywh")[None].to(self.device),
            "input_boxes_labels": torch.tensor([[int(flag) for flag in positive]], device=self.device),
        }
        one_phrase = torch.ones(1, 1, dtype=torch.bool, device=self.device)
        with self._lock, torch.inference_mode():
            phrases = self._phrases([text or "visual"])
            answer = self._score_features(*self._vision(picture), phrases, box_threshold, geometry)
        return select(
            (height, width),
            answer,
            one_phrase,
            torch.zeros(1, dtype=torch.long, device=self.device),
            box_threshold,
            text_threshold,
            nms_iou,
            limit=max_objects,
        )

    def _vision(self, picture: Picture) -> tuple[Any, tuple[int, int]]:
        """The vision features of an image, or of the tracker's embedding of it (the detector's neck on the ViT's
        output it keeps), with the image's (height, width)."""
        if isinstance(picture, ImageEmbedding):
            from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

            neck: Any = self.model.vision_encoder.neck  # type: ignore[union-attr]
            backbone = torch.from_numpy(np.asarray(picture.extras[SAM3_BACKBONE], dtype=np.float32))
            features, positions = neck(backbone.to(self.device)[None])
            vision = Sam3VisionEncoderOutput(fpn_hidden_states=features, fpn_position_encoding=positions)
            return vision, picture.original_size
        pixels = self.processor(images=[picture], return_tensors="pt")["pixel_values"].to(self.device)
        return self.model.get_vision_features(pixel_values=pixels), size_of(picture)  # type: ignore[operator]

    def _phrases(self, phrases: list[str]) -> Any:
        return self.processor(text=phrases, return_tensors="pt").to(self.device)

    def _score_features(
        self,
        vision: Any,
        image_size: tuple[int, int],
        phrases: Any,
        floor: float,
        geometry: dict[str, torch.Tensor] | None = None,
    ) -> BoxScores:
        """Every phrase against one image's vision features, with the exemplar boxes of `geometry` (`Sam3Model`'s
        input_boxes and input_boxes_labels) when given. Only the boxes scoring above `floor` are kept, with their
        masks: the official model's 200 masks of 288x288 floats take 66 MB a phrase."""
        height, width = image_size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=self.device)
        count = len(phrases["input_ids"])
        logits, boxes, masks = [], [], []
        for phrase in range(count):
            output = self.model(
                vision_embeds=vision,
                input_ids=phrases["input_ids"][phrase : phrase + 1],
                attention_mask=phrases["attention_mask"][phrase : phrase + 1],
                **(geometry or {}),
            )
            scores = output.pred_logits[0].float().sigmoid() * output.presence_logits[0].float().sigmoid()
            kept = (scores > floor).nonzero()[:, 0]
            # The score of the query for its own phrase; nothing for the others (as OWLv2's phrases are apart).
            row_logits = torch.full((len(kept), count), float("-inf"), device=self.device)
            row_logits[:, phrase] = torch.logit(scores[kept])
            logits.append(row_logits)
            boxes.append(output.pred_boxes[0, kept].float() * scale)
            masks.append(output.pred_masks[0, kept].float())
        return BoxScores(torch.cat(logits), torch.cat(boxes), torch.cat(masks))


def load_sam3_detector(folder: Path, device: str = "auto", shares_encoder: bool = False) -> Sam3Detector:
    """SAM 3's detector saved in `folder`; WrongCheckpoint when it holds another model. `shares_encoder`: the
    segmenter is SAM 3's tracker on this folder, keeping the ViT's output in its embeddings (`score_encoded`)."""
    import transformers

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise WrongCheckpoint(
            f"{folder} holds no config.json: DETECTOR=sam3 reads the facebook/sam3 folder, or one saved by transformers"
        )
    found_type = json.loads(config_file.read_text()).get("model_type")
    if found_type not in SAM3_MODEL_TYPES:
        raise WrongCheckpoint(
            f"{folder} holds a {found_type!r} model; DETECTOR=sam3 reads 'sam3_video' or 'sam3' models"
        )
    if not (folder / "tokenizer_config.json").is_file():
        raise WrongCheckpoint(
            f"{folder} holds no tokenizer (tokenizer_config.json): SAM 3's text prompts need the tokenizer's files, "
            "which `python -m backend weights download --detector sam3` fetches with the model"
        )
    processor = transformers.Sam3Processor.from_pretrained(folder, local_files_only=True)
    model = transformers.Sam3Model.from_pretrained(folder, local_files_only=True)
    weights = sorted(folder.glob("*.safetensors"))
    made_of = ["sam3", config_file.read_text(), [sha256_of(path) for path in weights]]
    identity = "sam3-" + hashlib.sha256(repr(made_of).encode()).hexdigest()[:16]
    log.info("loaded SAM 3 detector %s from %s", identity, folder)
    return Sam3Detector(model, processor, resolve_device(device), identity, shares_encoder)
