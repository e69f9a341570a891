"""SAM 3's exemplars ("find every object like this one"): the backend's boxes, scores and masks for exemplar boxes,
with or without the label's text, equal transformers' own `Sam3Processor` + `Sam3Model` with its
`post_process_instance_segmentation`, from the image and through the float16 cached embedding; then the same through
Label Studio's `interactive-annotating` request, drawn with the exemplar control.

The model is the reduced SAM 3 with random weights of tests/test_sam3_detector.py.
"""

from __future__ import annotations

from dataclasses import replace
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
from backend.protocol.label_config import parse_label_config
from tests.assets import decode_brush, recorded
from tests.conftest import TASK_IMAGES, make_client
from tests.detector_weights import write_sam3
from tests.test_detectors import NO_CAP, as_the_backend_selects
from tests.test_grounding_dino import batch_body
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


EXEMPLAR_CONTROL = (
    '<RectangleLabels name="find" toName="image" smart="true" exemplar="{mode}">'
    '<Label value="Car"/><Label value="Wheel"/></RectangleLabels>'
)


def exemplar_body(image_url: str, mode: str = "true") -> dict:
    """Label Studio's recorded smart-rectangle request (05) with the exemplar control declared first: two Car
    exemplars and a Wheel one drawn with it, and the recorded Car box of the smart RectangleLabels, which keeps its
    own answer."""
    body = recorded("05-predict-interactive-rectangle.json")
    body["tasks"][0]["data"]["image"] = image_url
    body["label_config"] = body["label_config"].replace(
        '<BrushLabels name="tag"', EXEMPLAR_CONTROL.format(mode=mode) + '\n  <BrushLabels name="tag"'
    )
    (drawn,) = body["params"]["context"]["result"]
    regions = [drawn]
    for index, (x, y, label) in enumerate([(10.0, 20.0, "Car"), (55.0, 30.0, "Car"), (40.0, 60.0, "Wheel")]):
        value = {"x": x, "y": y, "width": 30.0, "height": 25.0, "rotation": 0, "rectanglelabels": [label]}
        regions.append({**drawn, "id": f"exemplar{index}", "from_name": "find", "value": value})
    body["params"]["context"]["result"] = regions
    return body


def exemplars_in_pixels(body: dict, label: str, size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    height, width = size
    boxes = []
    for region in body["params"]["context"]["result"]:
        value = region["value"]
        if region["from_name"] == "find" and value["rectanglelabels"] == [label]:
            x0, y0 = value["x"] / 100 * width, value["y"] / 100 * height
            boxes.append((x0, y0, x0 + value["width"] / 100 * width, y0 + value["height"] / 100 * height))
    return boxes


@pytest.mark.parametrize("mode", ["true", "text"])
def test_an_exemplar_box_in_label_studio_gives_every_object_like_it(
    settings, sam3_folder, redis_url, label_studio, media_root, mode
):
    client, predictor = make_client(shared_settings(settings, sam3_folder, redis_url))
    detector = predictor.detector.get(120)
    passes = []  # the detector's own image encoder never runs: it reads the tracker's cached embedding
    hook = detector.model.vision_encoder.backbone.register_forward_hook(lambda *args: passes.append(1))
    image_url = batch_body(label_studio)["tasks"][3]["data"]["image"]  # the stand-in's car
    body = exemplar_body(image_url, mode)
    response = client.post("/predict", json=body)
    hook.remove()
    assert response.status_code == 200, response.json
    assert passes == []
    answered = response.json["results"][0]["result"]
    regions = [region for region in answered if region["type"] == "brushlabels"]
    boxes = [region for region in answered if region["type"] == "rectanglelabels"]
    assert all(region["from_name"] == "tag" for region in regions) and all(box["from_name"] == "tag3" for box in boxes)
    # The smart rectangle's own object first, then each label's instances: SAM 3's masks and scores (and each
    # instance's box in the smart RectangleLabels, which has the labels too, as for a text prompt).
    pixels = decode_image((media_root / "public/car_512x384_http.jpg").read_bytes(), 10**8)
    expected = []
    for label in ("Car", "Wheel"):
        drawn = exemplars_in_pixels(body, label, pixels.shape[:2])
        text = parse_label_config(body["label_config"]).phrases[label][0] if mode == "text" else None
        found = detector.find_like(pixels, drawn, [True] * len(drawn), text, 0.0, 0.0, 3)
        expected += [(label, detection) for detection in found]
    assert regions[0]["value"]["brushlabels"] == ["Car"]
    assert len(regions) == 1 + len(expected) >= 3 and len(boxes) == len(expected)
    for region, (label, detection) in zip(regions[1:], expected, strict=True):
        assert region["value"]["brushlabels"] == [label]
        assert detection.mask is not None and mask_iou(decode_brush(region), detection.mask) >= 0.95
        assert region["score"] == pytest.approx(detection.score, abs=0.01)


def test_exemplar_boxes_without_sam3_as_the_detector_are_refused_naming_the_setting(settings, label_studio):
    client, _ = make_client(settings)
    body = exemplar_body(batch_body(label_studio)["tasks"][3]["data"]["image"])
    response = client.post("/predict", json=body)
    assert response.status_code == 422
    assert "set DETECTOR=sam3" in response.json["error"] and "'find'" in response.json["error"]


def test_only_negative_exemplars_are_refused(settings, label_studio):
    client, _ = make_client(replace(settings, detector="sam3"))
    body = exemplar_body(batch_body(label_studio)["tasks"][3]["data"]["image"])
    for region in body["params"]["context"]["result"]:
        if region["value"]["rectanglelabels"] == ["Wheel"]:
            region["is_positive"] = False
    response = client.post("/predict", json=body)
    assert response.status_code == 422
    assert "exemplar boxes of 'Wheel' are all negative" in response.json["error"]


def test_the_exemplar_control_is_no_output_control():
    config = parse_label_config(exemplar_body("/data/x.jpg", "text")["label_config"])
    assert config.exemplar is not None and config.exemplar.name == "find" and config.exemplar_text
    assert config.rectangle is not None and config.rectangle.name == "tag3"
    # Declared before the BrushLabels, its bare labels leave the brush's predicted_values as the labels' phrases.
    assert config.phrases["Wheel"] == ("wheel", "tyre")
