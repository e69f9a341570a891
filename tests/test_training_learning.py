"""Fine-tuning learns: a small SAM with random weights, trained for a few steps on synthetic shapes,
segments held-out images better, and the fine-tuned weights serve through ONNX as they scored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.models.base import ImageEmbedding, SegmentPrompt
from backend.models.sam import SamSegmenter, decoder_state, with_decoder_state
from backend.training.finetune import (
    FinetuneConfig,
    _served_choice,
    decode,
    evaluate_miou,
    evaluation_prompts,
    finetune,
    make_example,
)
from tests.assets import build_small_sam
from tests.synthetic_shapes import shape_images

# From random weights the decoder needs about ten steps to start learning; twelve give a clear margin.
CONFIG = FinetuneConfig(steps=12, batch_size=2, learning_rate=1e-3, correction_rounds=1, seed=0)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(2)
    base = SamSegmenter(build_small_sam(seed=0), "small-sam", torch.device("cpu"), "onnx")
    examples = [make_example(base.encode(image), mask) for image, mask in shape_images(range(11))]
    train, held_out = examples[:8], examples[8:]
    encoder_before = {key: value.clone() for key, value in base.sam.image_encoder.state_dict().items()}
    model = with_decoder_state(base.sam)
    before = evaluate_miou(model, held_out)
    report = finetune(model, train, CONFIG)
    after = evaluate_miou(model, held_out)
    return base, model, held_out, before, after, report, encoder_before


def test_finetuning_raises_held_out_miou_by_a_margin(trained):
    base, model, held_out, before, after, report, _ = trained
    assert report.steps == CONFIG.steps and report.last_loss < report.first_loss
    assert after >= before + 0.25, (before, after)
    # The serving SAM is untouched: the copy shares only the (frozen) image encoder.
    assert evaluate_miou(base.sam, held_out) == pytest.approx(before)


def test_only_the_prompt_encoder_and_mask_decoder_change(trained):
    base, model, *_, encoder_before = trained
    assert model.image_encoder is base.sam.image_encoder
    for key, value in base.sam.image_encoder.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key
    tuned, original = decoder_state(model), decoder_state(base.sam)
    assert set(tuned) == set(original) and all(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in tuned)
    assert any(not torch.equal(tuned[key], original[key]) for key in tuned)


def test_finetuned_weights_served_through_onnx_give_the_trained_masks(trained):
    base, model, held_out, *_ = trained
    variant = base.with_decoder_state(decoder_state(model))
    assert variant.identity == base.identity  # the embedding cache key does not change
    example = held_out[0]
    box_prompt = evaluation_prompts(example)[0]
    with torch.inference_mode():
        logits, scores = decode(model, torch.from_numpy(example.features.astype(np.float32))[None], box_prompt, True)
        expected = model.postprocess_masks(
            _served_choice(logits, scores)[None, None], example.input_size, example.original_size
        )[0, 0]
    # Prompts on the original image: scale the 1024² box back by the resize factor.
    scale = max(example.original_size) / 1024
    box = tuple(coordinate * scale for coordinate in box_prompt.box)
    embedding = ImageEmbedding(example.features, example.original_size, example.input_size)
    (served,) = variant.decode(embedding, [SegmentPrompt(box=box)])
    agreement = (served.mask == (expected > 0).numpy()).mean()
    assert agreement > 0.995
    assert served.score == pytest.approx(float(scores.max()), abs=1e-3)
