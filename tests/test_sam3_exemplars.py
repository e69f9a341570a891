"""SAM 3's exemplars ("find every object like this one"): the backend's boxes, scores and masks for exemplar boxes,
with or without the label's text, equal transformers' own `Sam3Processor` + `Sam3Model` with its
`post_process_instance_segmentation`, from the image and through the float16 cached embedding; then the same through
Label Studio's `interactive-annotating` request, drawn with the exemplar control.

The model is the reduced SAM 3 with random weights of tests/test_sam3_detector.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from backend.cache.embeddings import deserialize_embedding, serialize_embedding
from backend.cache.store import make_store
from backend.images import decode_image
from backend.models.detector import NMS_IOU, Detection
from backend.models.registry import load_detector, load_segmenter
from backend.models.sam3_detector import Sam3Detector, load_sam3_detector
from tests.conftest import TASK_IMAGES
from tests.detector_weights import write_sam3
from tests.test_detectors import NO_CAP, as_the_backend_selects
from tests.test_sam3_detector import mask_iou, shared_settings, widest_gap


@pytest.fixture(scope="module")
def sam3_folder(tmp_path_factory) -> Path:
    return write_sam3(tmp_path_factory.mktemp("sam3-exemplars") / "sam3")


# Two exemplars of one kind and one of what is not wanted, in pixels of voc.jpg.
EXEMPLARS = [(40.0, 60.0, 180.0, 200.0), (200.0, 80.0, 300.0, 190.0), (10.0, 10.0, 60.0, 50.0)]
POSITIVE = [True, True, False]
IMAGE = decode_image(TASK_IMAGES["upload/1/voc.jpg"](), 10**8)


@pytest.fixture(scope="module")
def detector(sam3_folder) -> Sam3Detector:
    return load_sam3_detector(sam3_folder, "cpu")


@pytest.fixture
def image() -> np.ndarray:
    return IMAGE


def library_answer(detector: Sam3Detector, image: np.ndarray, text: str | None, threshold: float):
    """transformers' own answer for the exemplars, as its documentation prompts boxes (with or without text)."""
    inputs = detector.processor(
        images=image,
        text=text,
        input_boxes=[[list(box) for box in EXEMPLARS]],
        input_boxes_labels=[[int(flag) for flag in POSITIVE]],
        return_tensors="pt",
    )
    with torch.inference_mode():
        outputs = detector.model(**inputs)
    (result,) = detector.processor.post_process_instance_segmentation(
        outputs, threshold=threshold, mask_threshold=0.5, target_sizes=[image.shape[:2]]
    )
    return result


def library_detections(
    detector: Sam3Detector, image: np.ndarray, text: str | None, threshold: float, nms_iou: float
) -> tuple[list[Detection], list[np.ndarray]]:
    """The library's instances, selected as the backend selects every detector's boxes, with their masks."""
    result = library_answer(detector, image, text, threshold)
    scores = result["scores"]
    selected = as_the_backend_selects(image.shape[:2], result["boxes"], scores, [0] * len(scores), [0], nms_iou)
    masks = result["masks"].bool().numpy()
    by_score = {round(float(score), 6): mask for score, mask in zip(scores.tolist(), masks, strict=True)}
    return selected, [by_score[round(detection.score, 6)] for detection in selected]


def middle_threshold(detector: Sam3Detector, image: np.ndarray, text: str | None) -> float:
    """A threshold keeping about half of the library's instances, so that the comparison selects something real."""
    scores = library_answer(detector, image, text, 0.0)["scores"].sort().values
    return float(scores[len(scores) // 2])


@pytest.mark.parametrize("text", [None, "car"], ids=["exemplars", "text-and-exemplars"])
@pytest.mark.parametrize("nms_iou", [1.0, NMS_IOU], ids=["every-instance", "deduplicated"])
def test_exemplar_boxes_scores_and_masks_equal_sam3_processor_and_model(detector, image, text, nms_iou):
    """With no de-duplication every instance over the threshold is compared; random weights give boxes that
    overlap so much that NMS keeps one of them."""
    threshold = middle_threshold(detector, image, text)
    theirs, their_masks = library_detections(detector, image, text, threshold, nms_iou)
    ours = detector.find_like(image, EXEMPLARS, POSITIVE, text, threshold, 0.0, NO_CAP, nms_iou)
    assert len(ours) == len(theirs) >= (5 if nms_iou == 1.0 else 1)
    for mine, library, library_mask in zip(ours, theirs, their_masks, strict=True):
        assert mine.box == pytest.approx(library.box, abs=1e-3)
        assert mine.score == pytest.approx(library.score, abs=1e-6)
        assert mine.phrase == 0
        assert mine.mask is not None and np.array_equal(mine.mask, library_mask)


def test_the_exemplars_and_the_text_change_the_answer(detector, image):
    """The boxes reach the model: other exemplars, or the text beside them, give other scores."""
    alone = detector.find_like(image, EXEMPLARS, POSITIVE, None, 0.0, 0.0, NO_CAP)
    other = detector.find_like(image, EXEMPLARS[:1], [True], None, 0.0, 0.0, NO_CAP)
    texted = detector.find_like(image, EXEMPLARS, POSITIVE, "car", 0.0, 0.0, NO_CAP)
    scores = [sorted(detection.score for detection in found) for found in (alone, other, texted)]
    assert scores[0] != scores[1] and scores[0] != scores[2]


@pytest.mark.parametrize("text", [None, "car"], ids=["exemplars", "text-and-exemplars"])
def test_exemplars_on_the_cached_float16_embedding_equal_those_on_the_image(
    settings, sam3_folder, redis_url, image, text
):
    chosen = shared_settings(settings, sam3_folder, redis_url)
    detector = load_detector(chosen)
    tracker = load_segmenter(chosen)
    assert isinstance(detector, Sam3Detector) and detector.shares_encoder
    store = make_store(redis_url, 0)
    store.set("test:sam3:exemplars", serialize_embedding(tracker.encode(image)), 60)
    cached = deserialize_embedding(store.get("test:sam3:exemplars") or b"")
    everything = detector.find_like(image, EXEMPLARS, POSITIVE, text, 0.0, 0.0, NO_CAP, 1.0)
    threshold = widest_gap([detection.score for detection in everything])
    direct = detector.find_like(image, EXEMPLARS, POSITIVE, text, threshold, 0.0, NO_CAP, 1.0)
    encoded = detector.find_like(cached, EXEMPLARS, POSITIVE, text, threshold, 0.0, NO_CAP, 1.0)
    assert len(encoded) == len(direct) > 1
    for mine, theirs in zip(encoded, direct, strict=True):
        assert mine.score == pytest.approx(theirs.score, abs=0.01)
        assert mine.box == pytest.approx(theirs.box, abs=2.0)
        assert mine.mask is not None and theirs.mask is not None and mask_iou(mine.mask, theirs.mask) >= 0.95
