"""Every detector behind DETECTOR gives the boxes, scores and labels of its library's own post-processing.

Each model has random weights at reduced sizes, saved in its own library's format (transformers' `save_pretrained`;
groundingdino-py's `{"model": state_dict}` checkpoint) and loaded through the backend's own loader. The library's
answer for the same image and caption (groundingdino-py's `util.inference.predict` on its `load_image`; transformers'
processor, model and `post_process_grounded_object_detection`) is then clamped to the image, de-duplicated within
each label and capped as the backend does for every detector, and must equal what `detect` returns.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import batched_nms, box_convert

from backend.config import Settings
from backend.errors import CheckpointMissing, SettingsError, WrongCheckpoint
from backend.images import decode_image
from backend.models.detector import NMS_IOU, Detection, Detector
from backend.models.grounding_dino import load_grounding_dino
from backend.models.registry import detector_weights, load_detector
from backend.models.transformers_detectors import load_transformers_detector
from tests.assets import recorded
from tests.conftest import TRANSFORMERS_DETECTORS as TRANSFORMERS_KINDS
from tests.conftest import make_client

# Three phrases, the last two one label: boxes of "wheel" and "tyre" are de-duplicated together.
CAPTION = "car . wheel . tyre ."
SPANS = [(0, 3), (6, 11), (14, 18)]
GROUPS = [0, 1, 1]
NO_CAP = 10_000


@pytest.fixture
def image(media_root) -> np.ndarray:
    return decode_image((media_root / "upload/1/voc.jpg").read_bytes(), 10**8)


def as_the_backend_selects(
    image_size: tuple[int, int],
    boxes: torch.Tensor,
    scores: torch.Tensor,
    phrases: list[int],
    groups: list[int],
    nms_iou: float = NMS_IOU,
) -> list[Detection]:
    """A library's detections (pixel x0, y0, x1, y1 boxes, scores, phrase of each), clamped to the image, at least
    a pixel wide and high, de-duplicated within each label and sorted best first."""
    height, width = image_size
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    sized = ((boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)).nonzero()[:, 0]
    label_of = torch.as_tensor([groups[phrase] for phrase in phrases], dtype=torch.long)
    kept = sized[batched_nms(boxes[sized], scores[sized], label_of[sized], nms_iou)]
    return [Detection(tuple(boxes[i].tolist()), float(scores[i]), phrases[i]) for i in kept.tolist()]


def assert_same(ours: list[Detection], theirs: list[Detection]) -> None:
    assert len(ours) == len(theirs) > 0
    for mine, library in zip(ours, theirs, strict=True):
        assert mine.box == pytest.approx(library.box, abs=1e-3)
        assert mine.score == pytest.approx(library.score, abs=1e-6)
        assert mine.phrase == library.phrase


def middle_score(detector: Detector, image: np.ndarray) -> float:
    """A box threshold between two of the image's box scores, keeping the higher half of the distinct ones: the
    test compares a real selection, not all or none (random weights give many scores of exactly 1)."""
    with torch.inference_mode():
        (answer,) = detector.score([image], CAPTION, SPANS, 0.0)
    distinct = answer.token_logits.max(dim=1).values.sigmoid().unique()
    assert len(distinct) > 2
    middle = len(distinct) // 2
    return float(distinct[middle - 1] + distinct[middle]) / 2


def test_groundingdino_py_boxes_equal_its_own_predict(grounding_dino_files, media_root, tmp_path):
    """groundingdino-py's `predict` reads its `load_image` at 800 pixels and scores a box by its best token; its
    phrases are not labels, so every phrase here is one label and only boxes and scores are compared."""
    from groundingdino.util.inference import load_image, predict

    detector = load_grounding_dino(
        grounding_dino_files.checkpoint, grounding_dino_files.config, grounding_dino_files.text_encoder, "cpu", 800
    )
    path = media_root / "upload/1/voc.jpg"
    pixels, transformed = load_image(str(path))
    threshold = middle_score(detector, pixels)
    boxes, scores, _ = predict(detector.model, transformed, CAPTION, threshold, 0.0, device="cpu")
    height, width = pixels.shape[:2]
    pixel_boxes = box_convert(boxes * torch.tensor([width, height, width, height]), "cxcywh", "xyxy")
    theirs = as_the_backend_selects((height, width), pixel_boxes, scores, [0] * len(scores), [0])
    (ours,) = detector.detect([pixels], CAPTION, SPANS, [0, 0, 0], threshold, 0.0, NO_CAP)
    assert_same([replace(detection, phrase=0) for detection in ours], theirs)


@pytest.mark.parametrize("kind", ["grounding-dino", "mm-grounding-dino"])
def test_transformers_grounding_dino_boxes_equal_the_processors_post_processing(kind, detector_folders, image):
    detector = load_transformers_detector(kind, detector_folders[kind], "cpu", 128)
    threshold = middle_score(detector, image)
    inputs = detector.processor(images=[Image.fromarray(image)], text=[CAPTION], return_tensors="pt")
    with torch.inference_mode():
        outputs = detector.model(**inputs)
    (result,) = detector.processor.post_process_grounded_object_detection(
        outputs, inputs.input_ids, threshold=threshold, text_threshold=0.0, target_sizes=[image.shape[:2]]
    )
    theirs = as_the_backend_selects(
        image.shape[:2], result["boxes"], result["scores"], [0] * len(result["scores"]), [0]
    )
    (ours,) = detector.detect([image], CAPTION, SPANS, [0, 0, 0], threshold, 0.0, NO_CAP)
    assert_same([replace(detection, phrase=0) for detection in ours], theirs)


def test_owlv2_boxes_scores_and_labels_equal_the_processors_post_processing(detector_folders, image):
    """OWLv2 reads each phrase as its own query: its label is the phrase, so labels are compared too."""
    detector = load_transformers_detector("owlv2", detector_folders["owlv2"], "cpu")
    threshold = middle_score(detector, image)
    phrases = [CAPTION[start:end] for start, end in SPANS]
    inputs = detector.processor(images=[Image.fromarray(image)], text=[phrases], return_tensors="pt")
    with torch.inference_mode():
        outputs = detector.model(**inputs)
    (result,) = detector.processor.post_process_grounded_object_detection(
        outputs, threshold=threshold, target_sizes=[image.shape[:2]], text_labels=[phrases]
    )
    assert {label for label in result["text_labels"]} <= set(phrases)
    theirs = as_the_backend_selects(
        image.shape[:2], result["boxes"], result["scores"], result["labels"].tolist(), GROUPS
    )
    (ours,) = detector.detect([image], CAPTION, SPANS, GROUPS, threshold, 0.0, NO_CAP)
    assert_same(ours, theirs)
    assert {detection.phrase for detection in ours} == {0, 1, 2}  # every phrase won some box


@pytest.mark.parametrize("kind", TRANSFORMERS_KINDS)
def test_each_transformers_detector_batches_caps_and_thresholds(kind, detector_folders, image):
    detector = load_transformers_detector(kind, detector_folders[kind], "cpu", 128)
    images = [image, np.ascontiguousarray(image[::-1])]  # one size: no padding, which DETR-like models feel
    capped = detector.detect(images, CAPTION, SPANS, GROUPS, 0.0, 0.0, max_objects=4)
    one_by_one = [detector.detect([each], CAPTION, SPANS, GROUPS, 0.0, 0.0, max_objects=4)[0] for each in images]
    for found, alone, picture in zip(capped, one_by_one, images, strict=True):
        assert len(found) == 4 and [d.score for d in found] == sorted((d.score for d in found), reverse=True)
        height, width = picture.shape[:2]
        assert all(0 <= d.box[0] < d.box[2] <= width and 0 <= d.box[1] < d.box[3] <= height for d in found)
        # A batch of two gives each image what it gets alone.
        np.testing.assert_allclose([d.box for d in found], [d.box for d in alone], atol=0.05)
    # Scores are sigmoids: none exceeds 1, so a box threshold of 1 lets nothing through.
    assert detector.detect(images, CAPTION, SPANS, GROUPS, 1.0, 0.0, max_objects=4) == [[], []]


@pytest.mark.parametrize("kind", TRANSFORMERS_KINDS)
def test_the_detector_setting_loads_each_model_from_its_folder(kind, detector_folders, settings):
    chosen = replace(settings, detector=kind, detector_model=str(detector_folders[kind]), device="cpu")
    detector = load_detector(chosen)
    assert detector.identity.startswith(kind + "-")
    assert [location.path for location in detector_weights(chosen)] == [detector_folders[kind]]


def test_a_folder_of_another_model_is_refused_naming_both(detector_folders, settings):
    wrong = replace(settings, detector="grounding-dino", detector_model=str(detector_folders["owlv2"]))
    with pytest.raises(WrongCheckpoint, match="holds a 'owlv2' model; DETECTOR=grounding-dino reads"):
        load_detector(wrong)


def test_official_detectors_are_looked_for_in_the_weights_folder_and_mm_grounding_dino_asks_for_a_folder(settings):
    owl = detector_weights(replace(settings, detector="owlv2"))
    assert [location.path for location in owl] == [Path(settings.weights_dir) / "owlv2-base-patch16-ensemble"]
    with pytest.raises(CheckpointMissing, match="DETECTOR_MODEL") as missing:
        load_detector(replace(settings, detector="owlv2"))
    assert "python -m backend weights download" in str(missing.value)
    with pytest.raises(CheckpointMissing, match="no pinned official revision"):
        detector_weights(replace(settings, detector="mm-grounding-dino"))


def test_an_unknown_detector_stops_the_start_naming_the_choices():
    with pytest.raises(SettingsError, match="DETECTOR") as refused:
        Settings.from_env({"DETECTOR": "yolo"})
    assert "owlv2" in str(refused.value)


def test_text_prompts_run_through_a_transformers_detector_and_its_token_limit(grounded_settings, detector_folders):
    owl = replace(grounded_settings, detector="owlv2", detector_model=str(detector_folders["owlv2"]))
    client, predictor = make_client(owl)
    assert predictor.detector.get(120).name == "OWLv2"
    response = client.post("/predict", json=recorded("06-predict-interactive-text.json"))
    assert response.status_code == 200, response.json
    regions = response.json["results"][0]["result"]
    assert regions and {region["value"].get("brushlabels", ["Car"])[0] for region in regions} == {"Car"}
    # OWLv2 reads each phrase on its own, at most 16 tokens (here a token a letter): a longer phrase is a 413.
    body = recorded("06-predict-interactive-text.json")
    body["params"]["context"]["result"][0]["value"] = {"text": ["Car: the red sedan parked"]}
    too_long = client.post("/predict", json=body)
    assert too_long.status_code == 413 and "OWLv2 reads at most 16" in too_long.json["error"]


def every_detector(kind: str, grounding_dino_files, detector_folders) -> Detector:
    if kind == "groundingdino-py":
        files = grounding_dino_files
        return load_grounding_dino(files.checkpoint, files.config, files.text_encoder, "cpu", 128)
    return load_transformers_detector(kind, detector_folders[kind], "cpu", 128)


@pytest.mark.parametrize("kind", ["groundingdino-py", *TRANSFORMERS_KINDS])
def test_a_batch_of_mixed_aspect_ratios_detects_what_each_image_gets_alone(
    kind, grounding_dino_files, detector_folders, image
):
    """A padded batch makes DETR-like models see other boxes (their attention and valid ratios feel the padding):
    images of other sizes in one chunk must not change an image's answer, or a cached detection would depend on
    which chunk came first."""
    detector = every_detector(kind, grounding_dino_files, detector_folders)
    tall = np.ascontiguousarray(image.transpose(1, 0, 2))
    wide = np.ascontiguousarray(np.concatenate([image, image[:, ::-1]], axis=1))
    half = np.ascontiguousarray(image[::2, ::2])  # the same aspect ratio: resized to the same size, batched
    images = [image, tall, wide, np.ascontiguousarray(image[::-1]), half]
    batched = detector.detect(images, CAPTION, SPANS, GROUPS, 0.0, 0.0, max_objects=8, batch_size=5)
    for found, picture in zip(batched, images, strict=True):
        (alone,) = detector.detect([picture], CAPTION, SPANS, GROUPS, 0.0, 0.0, max_objects=8)
        assert len(found) == len(alone) > 0
        np.testing.assert_allclose([d.box for d in found], [d.box for d in alone], atol=0.05)
        np.testing.assert_allclose([d.score for d in found], [d.score for d in alone], atol=1e-5)
        assert [d.phrase for d in found] == [d.phrase for d in alone]
