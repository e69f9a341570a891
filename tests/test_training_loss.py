"""SAM's loss against values worked out by hand on tensors of two pixels."""

from __future__ import annotations

import math

import pytest
import torch

from backend.training.loss import dice_loss, focal_loss, iou_mse, mask_iou, sam_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def focal_by_hand(logit: float, target: int, alpha: float = 0.25, gamma: float = 2.0) -> float:
    """Lin et al.'s focal loss for one pixel: -alpha_t (1 - p_t)^gamma log(p_t)."""
    p = sigmoid(logit)
    p_t = p if target else 1 - p
    alpha_t = alpha if target else 1 - alpha
    return -alpha_t * (1 - p_t) ** gamma * math.log(p_t)


# Two pixels: logits 0 and ln 3 (probabilities 1/2 and 3/4), truth 1 and 0.
LOGITS = torch.tensor([[[[0.0, math.log(3.0)]]]])
TARGETS = torch.tensor([[[1.0, 0.0]]])


def test_focal_loss_is_the_pixel_mean_of_lin_et_al():
    # pixel 1: 0.25 * (1/2)^2 * ln 2; pixel 2: 0.75 * (3/4)^2 * ln 4
    by_hand = (0.25 * 0.25 * math.log(2) + 0.75 * 0.5625 * math.log(4)) / 2
    assert by_hand == pytest.approx((focal_by_hand(0.0, 1) + focal_by_hand(math.log(3), 0)) / 2)
    assert focal_loss(LOGITS[0], TARGETS).item() == pytest.approx(by_hand, rel=1e-6)


def test_dice_loss_is_one_minus_smoothed_soft_dice():
    # overlap 1/2, sum of probabilities 5/4, sum of targets 1: 1 - (2*1/2 + 1) / (5/4 + 1 + 1)
    assert dice_loss(LOGITS[0], TARGETS).item() == pytest.approx(1 - 2 / 3.25, rel=1e-6)


def test_dice_of_empty_prediction_on_empty_target_costs_nothing():
    assert dice_loss(torch.full((1, 2, 2), -50.0), torch.zeros(1, 2, 2)).item() == pytest.approx(0.0, abs=1e-6)


def test_mask_iou_thresholds_logits_at_zero():
    logits = torch.tensor([[[1.0, 2.0, -1.0, 3.0]]])
    targets = torch.tensor([[[1.0, 0.0, 1.0, 1.0]]])
    # predicted {0, 1, 3}, truth {0, 2, 3}: intersection 2, union 4
    assert mask_iou(logits, targets).item() == pytest.approx(0.5)
    assert mask_iou(torch.full((1, 1, 3), -1.0), torch.zeros(1, 1, 3)).item() == 1.0


def test_iou_mse_compares_the_score_with_the_real_iou():
    # the prediction (pixel 2 only) misses the truth (pixel 1 only): IoU 0, so the error is 0.6^2
    assert iou_mse(torch.tensor([[0.6]]), LOGITS, TARGETS).item() == pytest.approx(0.36)


def test_single_mask_loss_weights_focal_dice_and_iou_20_1_1():
    focal = (0.25 * 0.25 * math.log(2) + 0.75 * 0.5625 * math.log(4)) / 2
    dice = 1 - 2 / 3.25
    terms = sam_loss(LOGITS, torch.tensor([[0.6]]), TARGETS)
    assert terms.focal.item() == pytest.approx(focal, rel=1e-6)
    assert terms.dice.item() == pytest.approx(dice, rel=1e-6)
    assert terms.iou_mse.item() == pytest.approx(0.36)
    assert terms.total.item() == pytest.approx(20 * focal + dice + 0.36, rel=1e-6)


def test_ambiguous_prompt_trains_the_best_candidate_mask_and_every_iou_score():
    good = [4.0, -4.0]  # right on both pixels: IoU 1
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [good]]])  # (1 prompt, 2 candidates, 1, 2)
    scores = torch.tensor([[0.6, 0.5]])
    good_mask_loss = 20 * (focal_by_hand(4.0, 1) + focal_by_hand(-4.0, 0)) / 2 + (
        1 - (2 * sigmoid(4.0) + 1) / (sigmoid(4.0) + sigmoid(-4.0) + 1 + 1)
    )
    # the first candidate's IoU is 0 (error 0.36), the second's is 1 (error 0.25): their mean
    expected = good_mask_loss + (0.36 + 0.25) / 2
    assert sam_loss(logits, scores, TARGETS).total.item() == pytest.approx(expected, rel=1e-6)


def test_loss_gradient_reaches_logits_and_scores():
    logits = LOGITS.clone().requires_grad_()
    scores = torch.tensor([[0.6]], requires_grad=True)
    sam_loss(logits, scores, TARGETS).total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # d/ds (s - 0)^2 = 2 * 0.6
    assert scores.grad.item() == pytest.approx(1.2)
