"""The one small interface every open-vocabulary detector implements, and the selection all of them share.

A detector reads an image and a caption whose phrases are given as character spans, and scores every one of its
candidate boxes against the caption's tokens (GroundingDINO) or against each phrase (OWLv2, whose "tokens" are
the phrases). From there on nothing is model-specific: each box is attributed to the phrase whose tokens it
matched best, kept under the box and text thresholds, de-duplicated (NMS) among the phrases of one label and
capped, so the label mapping, the thresholds, NMS and the object cap mean the same whichever model runs.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import numpy as np
import torch
from torch.nn import functional
from torchvision.ops import batched_nms, box_convert

from backend.models.base import ImageEmbedding

NMS_IOU = 0.5  # boxes of one label overlapping more than this are one object

# What a detector reads of an image: its RGB uint8 pixels (H, W, 3), or, for a detector that shares the segmenter's
# image encoder (`Detector.shares_encoder`), the segmenter's embedding of it.
Picture = np.ndarray | ImageEmbedding


def size_of(picture: Picture) -> tuple[int, int]:
    """(height, width) of the image a picture shows."""
    if isinstance(picture, ImageEmbedding):
        return picture.original_size
    return picture.shape[0], picture.shape[1]


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the image
    score: float  # the model's confidence in the box: its best token (or phrase) score, as the library scores it
    phrase: int  # index into the caption's phrase spans
    # (H, W) bool at the image's size, from a detector that segments what it finds (SAM 3); None for a box alone
    mask: np.ndarray | None = None


@dataclass
class BoxScores:
    """A model's answer for one image, before any selection."""

    token_logits: torch.Tensor  # (boxes, tokens): how well each box matches each token of the caption, before sigmoid
    boxes: torch.Tensor  # (boxes, 4) x0, y0, x1, y1 in pixels of the image, not yet clamped to it
    mask_logits: torch.Tensor | None = None  # (boxes, h, w) low-resolution mask of each box, from SAM 3


class Detector(ABC):
    """A loaded detector; `detect` is safe to call from many threads (one model pass at a time)."""

    model: torch.nn.Module
    name: str  # what messages call the model ("GroundingDINO", "OWLv2")
    identity: str  # everything its boxes depend on besides image and query: cached detections are keyed by it
    max_text_tokens: int  # the most tokens `text_tokens` may count for a caption the model can read
    makes_masks = False  # whether each Detection comes with its mask, so that no segmenter decodes its box
    # Whether it reads the segmenter's embeddings in place of images (SAM 3 on the folder of SAM_MODEL_TYPE=sam3): an
    # image is then encoded once, for clicks and text alike.
    shares_encoder = False

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @abstractmethod
    def text_tokens(self, caption: str, spans: list[tuple[int, int]]) -> int:
        """How many tokens the model reads for the caption (or its longest phrase, for models reading each
        phrase on its own), to compare with `max_text_tokens`."""

    @abstractmethod
    def phrase_tokens(self, caption: str, spans: list[tuple[int, int]]) -> torch.Tensor:
        """(phrases, tokens) bool on the model's device: which tokens of `BoxScores.token_scores` spell each
        phrase; ValueError when a phrase has none."""

    @abstractmethod
    def score(
        self, images: list[np.ndarray], caption: str, spans: list[tuple[int, int]], floor: float
    ) -> list[BoxScores]:
        """One forward pass over RGB uint8 images of any sizes (called under the model lock, without autograd).
        Boxes scoring `floor` or less are never kept: an answer may leave them out (SAM 3 does, as each of its boxes
        carries a mask)."""

    def score_encoded(
        self, embeddings: list[ImageEmbedding], caption: str, spans: list[tuple[int, int]], floor: float
    ) -> list[BoxScores]:
        """`score` from the segmenter's embeddings of the images, for a detector that `shares_encoder`."""
        raise TypeError(f"{self.name} reads images, not a segmenter's embeddings")

    def batch_key(self, image: Picture) -> Hashable:
        """What images must share to be scored in one pass: a padded batch changes what DETR-like models answer
        (their attention and valid ratios see the padding), so by default only images of one aspect ratio go
        together, which the processors resize to one size (1024×768 and 640×480 alike)."""
        height, width = size_of(image)
        return Fraction(height, width)

    def detect(
        self,
        images: Sequence[Picture],
        caption: str,
        spans: list[tuple[int, int]],
        groups: list[int],
        box_threshold: float,
        text_threshold: float,
        max_objects: int,
        batch_size: int = 4,
    ) -> list[list[Detection]]:
        """Boxes in each RGB uint8 image (or each of the segmenter's embeddings, for a detector that
        `shares_encoder`) for the phrases at `spans` of `caption`, up to `batch_size` images of one `batch_key` a
        pass, so that an image gets the boxes it gets alone whatever else is detected with it.

        `groups` gives each phrase's label: see `select`. The `max_objects` best of each image are returned, best
        first.
        """
        membership = self.phrase_tokens(caption, spans)
        phrase_groups = torch.as_tensor(groups, device=membership.device)
        step = max(batch_size, 1)
        alike: dict[Hashable, list[int]] = {}
        for index, image in enumerate(images):
            alike.setdefault(self.batch_key(image), []).append(index)
        results: list[list[Detection]] = [[] for _ in images]
        for indices in alike.values():
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                pictures = [images[index] for index in chunk]
                with self._lock, torch.inference_mode():
                    if isinstance(pictures[0], ImageEmbedding):
                        embeddings = cast(list[ImageEmbedding], pictures)
                        answers = self.score_encoded(embeddings, caption, spans, box_threshold)
                    else:
                        answers = self.score(cast(list[np.ndarray], pictures), caption, spans, box_threshold)
                for index, answer in zip(chunk, answers, strict=True):
                    results[index] = select(
                        size_of(images[index]),
                        answer,
                        membership,
                        phrase_groups,
                        box_threshold,
                        text_threshold,
                        limit=max_objects,
                    )
        return results


def normalised_to_pixels(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """(n, 4) cx, cy, w, h relative to an image of `image_size` (height, width) → x0, y0, x1, y1 in its pixels."""
    height, width = image_size
    return box_convert(boxes, "cxcywh", "xyxy") * boxes.new_tensor([width, height, width, height])


def tokens_of_phrases(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> torch.Tensor:
    """(phrases, tokens) bool from a tokenizer's character offsets: the tokens lying inside each span."""
    membership = torch.zeros(len(spans), len(offsets), dtype=torch.bool)
    for phrase, (start, end) in enumerate(spans):
        for token, (first, last) in enumerate(offsets):
            membership[phrase, token] = last > first and first >= start and last <= end
    if not membership.any(dim=1).all():
        raise ValueError("a phrase of the caption has no token")
    return membership


def select(
    image_size: tuple[int, int],
    answer: BoxScores,
    membership: torch.Tensor,
    phrase_groups: torch.Tensor,
    box_threshold: float,
    text_threshold: float,
    nms_iou: float = NMS_IOU,
    limit: int | None = None,
) -> list[Detection]:
    """The boxes of one image worth keeping, best first, at most `limit`, each with its mask at the image's size when
    the answer has masks.

    A box's score is its best token over the whole caption (what GroundingDINO's and OWLv2's own post-processing
    call its confidence); it goes to the phrase with the highest mean token score, and is kept when the score is
    above `box_threshold`, that mean above `text_threshold`, and it is at least a pixel wide and high inside the
    image. Boxes are then de-duplicated (NMS at `nms_iou`) among phrases with the same `phrase_groups` entry.
    """
    height, width = image_size
    logits = answer.token_logits.float()[:, : membership.shape[1]]
    token_scores = logits.sigmoid()
    weights = membership.float() / membership.sum(dim=1, keepdim=True)
    phrase_means = token_scores @ weights.T  # (boxes, phrases)
    best_mean = phrase_means.max(dim=1, keepdim=True).values
    # Logits above 17 all give a score of exactly 1: phrases tied so are told apart by their mean logit, as the
    # libraries (which compare logits) tell them apart. (A masked token's -inf logit would make 0 * -inf = nan.)
    tied_logits = (logits.clamp(min=-1e4) @ weights.T).masked_fill(phrase_means < best_mean, float("-inf"))
    best_phrase = tied_logits.argmax(dim=1)
    best_mean = best_mean[:, 0]
    score = token_scores.max(dim=1).values
    boxes = answer.boxes.float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    sized = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
    keep = ((score > box_threshold) & (best_mean > text_threshold) & sized).nonzero()[:, 0]
    order = keep[batched_nms(boxes[keep], score[keep], phrase_groups[best_phrase[keep]], nms_iou)][:limit]
    masks = upscaled_masks(answer.mask_logits[order], image_size) if answer.mask_logits is not None else None
    detections = []
    for row, i in enumerate(order.tolist()):
        x0, y0, x1, y1 = boxes[i].tolist()
        mask = masks[row] if masks is not None else None
        detections.append(
            Detection((float(x0), float(y0), float(x1), float(y1)), float(score[i]), int(best_phrase[i]), mask)
        )
    return detections


def upscaled_masks(logits: torch.Tensor, image_size: tuple[int, int]) -> np.ndarray:
    """(n, h, w) low-resolution mask logits → (n, H, W) bool at the image's size, as SAM 3's processor binarises
    them (`post_process_instance_segmentation`): probabilities resized bilinearly, kept above one half. One mask at a
    time, so that memory holds one float mask of the image's size however many objects were kept."""
    masks = np.zeros((len(logits), *image_size), dtype=bool)
    for row, mask in enumerate(logits.float().sigmoid()):
        resized = functional.interpolate(mask[None, None], size=image_size, mode="bilinear", align_corners=False)
        masks[row] = (resized[0, 0] > 0.5).cpu().numpy()
    return masks
