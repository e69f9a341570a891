"""GroundingDINO (groundingdino-py 0.4.0): boxes for the phrases of one caption, for a batch of images in one pass.

The caption's phrases are given as character spans; every query box is attributed to the phrase whose tokens
it matched best, so the caller maps boxes back to labels without re-reading decoded text. Boxes are
de-duplicated per group of phrases (a label) and capped before anything expensive (SAM) sees them: with
untrained weights nearly all 900 queries pass any threshold.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import pickle
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torchvision.ops import batched_nms, box_convert

from backend.errors import WrongCheckpoint
from backend.models.checkpoints import GROUNDING_DINO_CHECKPOINT, sha256_of
from backend.models.sam import resolve_device

if TYPE_CHECKING:
    # Untyped (Any to the checker), but the model class, with the tokenizer and max_text_len a Module lacks.
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO

log = logging.getLogger(__name__)

NMS_IOU = 0.5  # boxes of one label overlapping more than this are one object
# The long side limit GroundingDINO was trained with for its 800-pixel short side.
MAX_SIZE_PER_SHORT_SIDE = 1333 / 800


def packaged_config(name: str = "GroundingDINO_SwinT_OGC.py") -> Path:
    """A model config shipped inside groundingdino-py."""
    import groundingdino

    return Path(groundingdino.__file__).parent / "config" / name


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the image
    score: float  # GroundingDINO's confidence: the highest token score of the box's phrase
    phrase: int  # index into the caption's phrase spans


def _read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The official file is `{"model": state_dict}`; a file that also pickles training objects is only
    unpickled in full when it is byte for byte the published checkpoint."""
    try:
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if sha256_of(checkpoint) != GROUNDING_DINO_CHECKPOINT.sha256:
            raise
        data = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint} holds no GroundingDINO state dict (expected {{'model': state_dict}})")
    # Checkpoints saved from DistributedDataParallel prefix every key.
    return {key.removeprefix("module."): value for key, value in state.items()}


def _text_encoder_name_to_the_log() -> None:
    """groundingdino-py prints its text encoder's name on stdout as it loads: at DEBUG in the log instead."""
    from groundingdino.util import get_tokenlizer

    library_log = logging.getLogger("groundingdino")
    get_tokenlizer.print = lambda *parts, **_: library_log.debug(" ".join(map(str, parts)))


def load_grounding_dino(
    checkpoint: Path,
    config: Path | None,
    text_encoder: Path,
    device: str = "auto",
    image_size: int = 800,
) -> GroundingDino:
    """Build the model described by `config` (default: the packaged SwinT OGC) and load the official-format
    `checkpoint`; `text_encoder` is a local folder holding the BERT's config, vocabulary and weights (never a hub
    name: nothing is downloaded here)."""
    _text_encoder_name_to_the_log()
    config = config or packaged_config()
    if not config.is_file():
        raise FileNotFoundError(f"GroundingDINO config {config} does not exist (GROUNDING_DINO_CONFIG)")
    if not (text_encoder / "config.json").is_file():
        raise WrongCheckpoint(
            f"GROUNDING_DINO_TEXT_ENCODER={text_encoder} is not a folder holding a Hugging Face BERT (config.json, "
            "vocab.txt, weights)"
        )
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    args = SLConfig.fromfile(str(config))
    args.text_encoder_type = str(text_encoder)
    target = resolve_device(device)
    args.device = target.type
    # Activation checkpointing only saves memory when training; at inference it costs time.
    args.use_checkpoint = False
    args.use_transformer_ckpt = False
    with contextlib.redirect_stdout(sys.stderr):  # the package prints its text encoder's name
        model = build_model(args)
    missing, unexpected = model.load_state_dict(_read_state_dict(checkpoint), strict=False)
    # The text encoder's pretrained weights stand in for BERT tensors a checkpoint may leave out.
    missing = [key for key in missing if not key.startswith("bert.")]
    if missing:
        raise ValueError(
            f"{checkpoint} does not match the GroundingDINO config {config.name}: "
            f"{len(missing)} tensors missing, e.g. {missing[:3]}"
        )
    if unexpected:
        log.info("ignored %d tensors of %s that the model does not use", len(unexpected), checkpoint)
    # What the boxes depend on besides the image and the query: cached detections are keyed by it.
    made_of = [sha256_of(checkpoint), hashlib.sha256(config.read_bytes()).hexdigest(), text_encoder, image_size]
    identity = "gdino-" + hashlib.sha256(repr(made_of).encode()).hexdigest()[:16]
    log.info(
        "loaded GroundingDINO %s from %s (config %s, text encoder %s)", identity, checkpoint, config.name, text_encoder
    )
    return GroundingDino(model, target, identity, image_size)


class GroundingDino:
    """A loaded GroundingDINO model; `detect` is safe to call from many threads (one pass at a time)."""

    def __init__(self, model: GroundingDINO, device: torch.device, identity: str, image_size: int = 800) -> None:
        import groundingdino.datasets.transforms as transforms
        from groundingdino.util.misc import nested_tensor_from_tensor_list

        self._batch = nested_tensor_from_tensor_list  # pads images of different sizes and masks the padding

        self.model = model.to(device).eval()
        self.device = device
        self.identity = identity
        self.tokenizer = model.tokenizer
        self.max_text_tokens: int = model.max_text_len
        self._transform = transforms.Compose(
            [
                transforms.RandomResize([image_size], max_size=round(image_size * MAX_SIZE_PER_SHORT_SIDE)),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )
        self._lock = threading.Lock()

    def caption_tokens(self, caption: str) -> int:
        """How many tokens GroundingDINO reads for `caption`, [CLS] and [SEP] included."""
        return len(self.tokenizer(caption)["input_ids"])

    def _phrase_tokens(self, caption: str, spans: list[tuple[int, int]]) -> torch.Tensor:
        """(phrases, tokens) bool: which tokens of the caption spell each phrase."""
        offsets = self.tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) > self.max_text_tokens:
            raise ValueError(f"the caption needs {len(offsets)} tokens; GroundingDINO reads {self.max_text_tokens}")
        membership = torch.zeros(len(spans), len(offsets), dtype=torch.bool)
        for phrase, (start, end) in enumerate(spans):
            for token, (first, last) in enumerate(offsets):
                membership[phrase, token] = last > first and first >= start and last <= end
        if not membership.any(dim=1).all():
            raise ValueError("a phrase of the caption has no token")
        return membership

    def detect(
        self,
        images: list[np.ndarray],
        caption: str,
        spans: list[tuple[int, int]],
        groups: list[int],
        box_threshold: float,
        text_threshold: float,
        max_objects: int,
        batch_size: int = 4,
    ) -> list[list[Detection]]:
        """Boxes in each RGB uint8 image for the phrases at `spans` of `caption`.

        A box is kept when its best token scores above `box_threshold` and the mean token score of its
        best phrase above `text_threshold`; boxes are then de-duplicated (NMS) among phrases of the same
        `groups` entry and the `max_objects` best of each image returned, best first.
        """
        membership = self._phrase_tokens(caption, spans).to(self.device)
        weights = membership.float() / membership.sum(dim=1, keepdim=True)
        phrase_groups = torch.as_tensor(groups, device=self.device)
        results: list[list[Detection]] = []
        for start in range(0, len(images), max(batch_size, 1)):
            chunk = images[start : start + max(batch_size, 1)]
            pixels = [self._transform(Image.fromarray(image), None)[0].to(self.device) for image in chunk]
            with self._lock, torch.inference_mode():
                outputs = self.model(self._batch(pixels), captions=[caption] * len(chunk))
            token_scores = outputs["pred_logits"].float().sigmoid()[:, :, : membership.shape[1]]
            for image, scores, boxes in zip(chunk, token_scores, outputs["pred_boxes"].float(), strict=True):
                results.append(
                    self._select(
                        image.shape[:2],
                        scores,
                        boxes,
                        membership,
                        weights,
                        phrase_groups,
                        box_threshold,
                        text_threshold,
                    )[:max_objects]
                )
        return results

    @staticmethod
    def _select(
        image_size: tuple[int, int],
        token_scores: torch.Tensor,  # (queries, tokens)
        boxes: torch.Tensor,  # (queries, 4) normalised cx, cy, w, h
        membership: torch.Tensor,
        weights: torch.Tensor,
        phrase_groups: torch.Tensor,
        box_threshold: float,
        text_threshold: float,
    ) -> list[Detection]:
        height, width = image_size
        phrase_means = token_scores @ weights.T  # (queries, phrases)
        best_mean, best_phrase = phrase_means.max(dim=1)
        # A box's confidence is its phrase's best token, as GroundingDINO scores a box by its best token.
        phrase_peaks = token_scores[:, None, :].masked_fill(~membership[None], 0).amax(dim=2)
        score = phrase_peaks.gather(1, best_phrase[:, None])[:, 0]
        pixel_boxes = box_convert(boxes, "cxcywh", "xyxy") * boxes.new_tensor([width, height, width, height])
        pixel_boxes[:, 0::2] = pixel_boxes[:, 0::2].clamp(0, width)
        pixel_boxes[:, 1::2] = pixel_boxes[:, 1::2].clamp(0, height)
        sized = (pixel_boxes[:, 2] - pixel_boxes[:, 0] >= 1) & (pixel_boxes[:, 3] - pixel_boxes[:, 1] >= 1)
        keep = ((score > box_threshold) & (best_mean > text_threshold) & sized).nonzero()[:, 0]
        order = keep[batched_nms(pixel_boxes[keep], score[keep], phrase_groups[best_phrase[keep]], NMS_IOU)]
        detections = []
        for i in order.tolist():
            x0, y0, x1, y1 = pixel_boxes[i].tolist()
            box = (float(x0), float(y0), float(x1), float(y1))
            detections.append(Detection(box, float(score[i]), int(best_phrase[i])))
        return detections
