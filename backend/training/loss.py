"""SAM's training loss (Kirillov et al. 2023, §3 and appendix A): 20 × focal + 1 × dice on the mask
logits, plus 1 × mean squared error between the predicted IoU and the IoU the mask really has."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import sigmoid_focal_loss

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0


def focal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask mean of the sigmoid focal loss over the last two (pixel) dimensions."""
    per_pixel = sigmoid_focal_loss(logits, targets, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="none")
    return per_pixel.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask 1 - soft dice, smoothed by 1 so that an empty prediction of an empty target costs nothing."""
    probabilities = logits.sigmoid().flatten(-2)
    flat_targets = targets.flatten(-2)
    overlap = (probabilities * flat_targets).sum(-1)
    return 1 - (2 * overlap + DICE_SMOOTH) / (probabilities.sum(-1) + flat_targets.sum(-1) + DICE_SMOOTH)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask IoU of the thresholded logits (> 0) with the binary targets; 1 when both are empty."""
    predicted = logits.flatten(-2) > 0
    truth = targets.flatten(-2) > 0.5
    intersection = (predicted & truth).sum(-1).float()
    union = (predicted | truth).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def iou_mse(iou_predictions: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask squared error of the IoU head; the actual IoU is a target, so no gradient reaches the masks."""
    return (iou_predictions - mask_iou(logits.detach(), targets)) ** 2


@dataclass
class LossTerms:
    total: torch.Tensor  # what is back-propagated
    focal: torch.Tensor
    dice: torch.Tensor
    iou_mse: torch.Tensor


def sam_loss(logits: torch.Tensor, iou_predictions: torch.Tensor, targets: torch.Tensor) -> LossTerms:
    """`logits` (B, M, H, W) for M candidate masks per prompt, `iou_predictions` (B, M), `targets` (B, H, W).

    With several candidates (an ambiguous prompt) only the one with the lowest mask loss gets the mask
    gradient, as SAM is trained; the IoU head learns from every candidate, since serving ranks them by it.
    """
    expanded = targets[:, None].expand_as(logits).to(logits.dtype)
    focal = focal_loss(logits, expanded)
    dice = dice_loss(logits, expanded)
    mse = iou_mse(iou_predictions, logits, expanded)
    mask_loss = FOCAL_WEIGHT * focal + DICE_WEIGHT * dice
    best = mask_loss.argmin(dim=1, keepdim=True)
    total = mask_loss.gather(1, best).squeeze(1) + IOU_WEIGHT * mse.mean(dim=1)
    return LossTerms(
        total=total.mean(),
        focal=focal.gather(1, best).mean(),
        dice=dice.gather(1, best).mean(),
        iou_mse=mse.mean(),
    )
