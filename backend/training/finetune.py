"""Fine-tuning SAM's prompt encoder and mask decoder the way SAM was trained, on cached image embeddings.

Prompts are simulated from each ground-truth mask as in the SAM paper (appendix A): the first prompt is
its box (with noise of 10 % of the side, at most 20 px) or a positive point inside it; then each round
adds one correction point drawn from the error region (positive where the mask was missed, negative
where it spilled over) and feeds the previous logits back as the mask prompt. The image encoder is
frozen, so only the embeddings are needed and the encoder never runs here. Masks are compared on the
decoder's 256×256 grid in training and at the image's own size in evaluation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from backend.models.base import ImageEmbedding
from backend.models.sam import IMAGE_SIZE, LOW_RES_SIZE
from backend.training.loss import mask_iou, sam_loss

log = logging.getLogger(__name__)

GRID_STRIDE = IMAGE_SIZE // LOW_RES_SIZE  # input pixels per cell of the decoder's mask grid
BOX_NOISE_FRACTION = 0.1
BOX_NOISE_MAX_PX = 20.0


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 200
    batch_size: int = 4  # masks per optimiser step
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    correction_rounds: int = 2  # decoder passes per mask after the first prompt
    seed: int = 0


@dataclass
class Example:
    """One ground-truth mask with its image's embedding."""

    features: np.ndarray  # (C, 64, 64) float16
    target: torch.Tensor  # (256, 256) bool: the mask on the decoder's grid of the padded 1024² input
    load_mask: Callable[[], np.ndarray]  # (H, W) bool at the image's own size, read only to evaluate
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def grid_target(mask: np.ndarray, input_size: tuple[int, int], original_size: tuple[int, int]) -> torch.Tensor:
    """The mask on the decoder's 256×256 grid, what the loss compares. Raises ValueError for a mask of another size
    than the image, or one too small for the grid. Resized as bytes: a byte per pixel of the mask while it runs."""
    if tuple(mask.shape) != tuple(original_size):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {original_size[::-1]}")
    height, width = input_size
    as_bytes = torch.from_numpy(mask).to(torch.uint8).mul_(255)[None, None]
    resized = F.interpolate(as_bytes, size=(height, width), mode="bilinear").to(torch.float32) / 255
    padded = F.pad(resized, (0, IMAGE_SIZE - width, 0, IMAGE_SIZE - height))
    target = F.interpolate(padded, size=(LOW_RES_SIZE, LOW_RES_SIZE), mode="area")[0, 0] >= 0.5
    if not target.any():
        raise ValueError("mask is too small to show on SAM's 256x256 mask grid")
    return target


def make_example(embedding: ImageEmbedding, mask: np.ndarray) -> Example:
    """An example held in memory, mask and all (`training.examples` streams a project's from disk instead)."""
    mask = mask.astype(bool)
    input_size = (int(embedding.input_size[0]), int(embedding.input_size[1]))
    original_size = (int(embedding.original_size[0]), int(embedding.original_size[1]))
    return Example(
        features=np.asarray(embedding.features, dtype=np.float16),
        target=grid_target(mask, input_size, original_size),
        load_mask=lambda: mask,
        input_size=input_size,
        original_size=original_size,
    )


@dataclass
class Prompt:
    """Prompts on the 1024² input, as SAM's prompt encoder takes them."""

    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    mask_logits: torch.Tensor | None = None  # (256, 256)

    def ambiguous(self) -> bool:
        """One click or one box alone: serving (SamOnnxModel) then picks among SAM's three candidate masks."""
        return len(self.points) + (self.box is not None) == 1


def _cell_centre(row: int, col: int) -> tuple[float, float]:
    return ((col + 0.5) * GRID_STRIDE, (row + 0.5) * GRID_STRIDE)


def _bounds(target: torch.Tensor) -> tuple[float, float, float, float]:
    rows, cols = torch.nonzero(target, as_tuple=True)
    return (
        float(cols.min()) * GRID_STRIDE,
        float(rows.min()) * GRID_STRIDE,
        float(cols.max() + 1) * GRID_STRIDE,
        float(rows.max() + 1) * GRID_STRIDE,
    )


class PromptSimulator:
    """Draws the SAM paper's training prompts from a seeded generator."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def _cell_in(self, region: torch.Tensor) -> tuple[int, int]:
        cells = torch.nonzero(region)
        row, col = cells[int(self.rng.integers(len(cells)))].tolist()
        return row, col

    def noisy_box(self, target: torch.Tensor) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = _bounds(target)
        width, height = x1 - x0, y1 - y0
        noise = self.rng.normal(0.0, BOX_NOISE_FRACTION, 4) * np.array([width, height, width, height])
        dx0, dy0, dx1, dy1 = np.clip(noise, -BOX_NOISE_MAX_PX, BOX_NOISE_MAX_PX)
        nx0, ny0 = min(max(x0 + dx0, 0.0), IMAGE_SIZE - 1.0), min(max(y0 + dy0, 0.0), IMAGE_SIZE - 1.0)
        nx1, ny1 = max(min(x1 + dx1, float(IMAGE_SIZE)), nx0 + 1.0), max(min(y1 + dy1, float(IMAGE_SIZE)), ny0 + 1.0)
        return (nx0, ny0, nx1, ny1)

    def first_prompt(self, target: torch.Tensor) -> Prompt:
        if self.rng.random() < 0.5:
            return Prompt(box=self.noisy_box(target))
        return Prompt(points=[_cell_centre(*self._cell_in(target))], labels=[1])

    def correction(self, predicted: torch.Tensor, target: torch.Tensor) -> tuple[tuple[float, float], int]:
        """A point in the error region: positive on a missed cell, negative on a spilled one."""
        errors = predicted ^ target
        if not errors.any():
            return _cell_centre(*self._cell_in(target)), 1
        row, col = self._cell_in(errors)
        return _cell_centre(row, col), int(target[row, col])


def decode(model: Sam, features: torch.Tensor, prompt: Prompt, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-resolution logits (1, M, 256, 256) and predicted IoUs (1, M) for one prompt on one embedding."""
    device = features.device
    points = None
    if prompt.points:
        points = (
            torch.tensor([prompt.points], dtype=torch.float32, device=device),
            torch.tensor([prompt.labels], dtype=torch.int64, device=device),
        )
    boxes = torch.tensor([prompt.box], dtype=torch.float32, device=device) if prompt.box is not None else None
    masks = prompt.mask_logits[None, None] if prompt.mask_logits is not None else None
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=masks)
    return model.mask_decoder(
        image_embeddings=features,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )


def _served_choice(logits: torch.Tensor, iou_predictions: torch.Tensor) -> torch.Tensor:
    """The candidate serving would show: the one with the highest predicted IoU, as (256, 256) logits."""
    return logits[0, int(iou_predictions[0].argmax())]


def _features(example: Example, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(example.features.astype(np.float32))[None].to(device)


@dataclass
class FinetuneReport:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def finetune(
    model: Sam,
    examples: Sequence[Example],
    config: FinetuneConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneReport:
    """Train `model`'s prompt encoder and mask decoder in place; `on_step(step, loss)` follows progress."""
    if not examples:
        raise ValueError("fine-tuning needs at least one example")
    device = model.device
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    simulator = PromptSimulator(rng)
    parameters = [*model.prompt_encoder.parameters(), *model.mask_decoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    # Only these two are put in training mode: the image encoder may be shared with a serving model.
    model.prompt_encoder.train()
    model.mask_decoder.train()
    started = time.perf_counter()
    losses: list[float] = []
    try:
        for step in range(config.steps):
            chosen = rng.choice(len(examples), size=min(config.batch_size, len(examples)), replace=False)
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for index in chosen:
                step_loss += _train_on_example(model, examples[int(index)], simulator, config, len(chosen), device)
            optimizer.step()
            losses.append(step_loss)
            if on_step is not None:
                on_step(step, step_loss)
    finally:
        model.prompt_encoder.eval()
        model.mask_decoder.eval()
    return FinetuneReport(config.steps, time.perf_counter() - started, losses[0], losses[-1])


def _train_on_example(
    model: Sam, example: Example, simulator: PromptSimulator, config: FinetuneConfig, batch: int, device: torch.device
) -> float:
    """Back-propagates this example's share of the step's loss; SAM's decoder batches prompts of one image
    only, so images go through it one at a time and gradients add up."""
    features = _features(example, device)
    target = example.target.to(device)
    prompt = simulator.first_prompt(example.target)
    rounds = 1 + config.correction_rounds
    total = 0.0
    for _ in range(rounds):
        logits, iou_predictions = decode(model, features, prompt, multimask=prompt.ambiguous())
        loss = sam_loss(logits, iou_predictions, target[None]).total / (rounds * batch)
        loss.backward()
        total += float(loss.detach())
        shown = _served_choice(logits, iou_predictions).detach()
        point, label = simulator.correction((shown > 0).cpu(), example.target)
        prompt = Prompt(
            points=[*prompt.points, point], labels=[*prompt.labels, label], box=prompt.box, mask_logits=shown
        )
    return total


def evaluation_prompts(example: Example) -> list[Prompt]:
    """Fixed prompts for a fair before/after comparison: the mask's exact box, and one click on the mask
    cell nearest its centroid."""
    cells = torch.nonzero(example.target).float()
    nearest = cells[((cells - cells.mean(0)) ** 2).sum(1).argmin()]
    return [Prompt(box=_bounds(example.target)), Prompt(points=[_cell_centre(*nearest.int().tolist())], labels=[1])]


@torch.inference_mode()
def evaluate_miou(model: Sam, examples: Sequence[Example]) -> float:
    """Mean IoU, at each image's own size, of the masks serving would show for `evaluation_prompts`."""
    if not examples:
        raise ValueError("evaluation needs at least one example")
    device = model.device
    scores = []
    for example in examples:
        features = _features(example, device)
        truth = torch.from_numpy(example.load_mask()).to(device)
        for prompt in evaluation_prompts(example):
            logits, iou_predictions = decode(model, features, prompt, multimask=prompt.ambiguous())
            shown = _served_choice(logits, iou_predictions)[None, None]
            full = model.postprocess_masks(shown, example.input_size, example.original_size)[0, 0]
            scores.append(float(mask_iou(full, truth)))
    return float(np.mean(scores))
