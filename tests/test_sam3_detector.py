"""SAM 3 as the detector (`DETECTOR=sam3`): boxes, scores and masks equal transformers' own `Sam3Processor` and
`Sam3Model` with its `post_process_instance_segmentation`, then pre-annotation brings those masks to Label Studio with
no segmenter pass.

The model is the whole reduced `Sam3VideoModel` (detector and tracker, one image encoder) with random weights, saved
by `save_pretrained` as facebook/sam3 holds it, so the one folder serves DETECTOR=sam3 and SAM_MODEL_TYPE=sam3.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.cache.detections import DetectionCache, packed_mask, unpacked_mask
from backend.cache.embeddings import deserialize_embedding, serialize_embedding
from backend.cache.store import make_store
from backend.errors import WrongCheckpoint
from backend.images import decode_image
from backend.models.base import SegmentPrompt
from backend.models.detector import Detection
from backend.models.registry import detector_weights, load_detector, load_segmenter
from backend.models.sam3_detector import Sam3Detector, load_sam3_detector
from backend.prompts.text import labels_query
from backend.protocol.label_config import parse_label_config
from tests.assets import decode_brush, encodes_logged, recorded
from tests.conftest import make_client
from tests.detector_weights import write_sam3
from tests.test_detectors import NO_CAP, as_the_backend_selects
from tests.test_grounding_dino import batch_body, config_with

CAPTION = "car . wheel . tyre ."
SPANS = [(0, 3), (6, 11), (14, 18)]
GROUPS = [0, 1, 1]


@pytest.fixture(scope="module")
def sam3_folder(tmp_path_factory) -> Path:
    return write_sam3(tmp_path_factory.mktemp("sam3") / "sam3")


@pytest.fixture(scope="module")
def detector(sam3_folder) -> Sam3Detector:
    return load_sam3_detector(sam3_folder, "cpu")


@pytest.fixture
def image(media_root) -> np.ndarray:
    return decode_image((media_root / "upload/1/voc.jpg").read_bytes(), 10**8)


def library_detections(detector: Sam3Detector, image: np.ndarray, threshold: float) -> tuple[list[Detection], list]:
    """transformers' own answer, one phrase at a time as its documentation prompts it, then selected as the backend
    selects every detector's boxes; with the processor's masks of the kept boxes."""
    boxes, scores, phrases, masks = [], [], [], []
    for phrase, (start, end) in enumerate(SPANS):
        inputs = detector.processor(images=image, text=CAPTION[start:end], return_tensors="pt")
        with torch.inference_mode():
            outputs = detector.model(**inputs)
        (result,) = detector.processor.post_process_instance_segmentation(
            outputs, threshold=threshold, mask_threshold=0.5, target_sizes=[image.shape[:2]]
        )
        boxes.append(result["boxes"])
        scores.append(result["scores"])
        masks += list(result["masks"].bool().numpy())
        phrases += [phrase] * len(result["scores"])
    selected = as_the_backend_selects(image.shape[:2], torch.cat(boxes), torch.cat(scores), phrases, GROUPS)
    by_score = {round(float(score), 6): mask for score, mask in zip(torch.cat(scores).tolist(), masks, strict=True)}
    return selected, [by_score[round(detection.score, 6)] for detection in selected]


def middle_threshold(detector: Sam3Detector, image: np.ndarray) -> float:
    """A threshold keeping about half of the image's boxes, so that the comparison selects something real."""
    with torch.inference_mode():
        (answer,) = detector.score([image], CAPTION, SPANS, 0.0)
    scores = answer.token_logits.max(dim=1).values.sigmoid().sort().values
    return float(scores[len(scores) // 2])


def test_boxes_scores_and_masks_equal_sam3_processor_and_model(detector, image):
    threshold = middle_threshold(detector, image)
    theirs, their_masks = library_detections(detector, image, threshold)
    (ours,) = detector.detect([image], CAPTION, SPANS, GROUPS, threshold, 0.0, NO_CAP)
    assert len(ours) == len(theirs) > 1
    for mine, library, library_mask in zip(ours, theirs, their_masks, strict=True):
        assert mine.box == pytest.approx(library.box, abs=1e-3)
        assert mine.score == pytest.approx(library.score, abs=1e-6)
        assert mine.phrase == library.phrase
        assert mine.mask is not None and mine.mask.shape == image.shape[:2]
        assert np.array_equal(mine.mask, library_mask)
    assert len({detection.phrase for detection in ours}) > 1  # more than one phrase found something


def test_boxes_under_the_threshold_are_left_out_with_their_masks_before_selection(detector, image):
    """Each box carries a mask of 288x288 floats: the answer holds only those that could be kept."""
    with torch.inference_mode():
        (everything,) = detector.score([image], CAPTION, SPANS, 0.0)
        threshold = middle_threshold(detector, image)
        (kept,) = detector.score([image], CAPTION, SPANS, threshold)
    assert kept.mask_logits is not None and everything.mask_logits is not None
    assert len(kept.boxes) == len(kept.mask_logits) < len(everything.boxes)
    assert bool((kept.token_logits.max(dim=1).values.sigmoid() > threshold).all())


def test_a_phrase_longer_than_the_text_encoders_context_is_counted_against_it(detector):
    long_phrase = "a red car parked beside the old stone wall"  # a token a letter: over 32
    assert detector.text_tokens(long_phrase, [(0, len(long_phrase))]) > detector.max_text_tokens == 32
    assert detector.text_tokens(CAPTION, SPANS) == len("wheel") + 2  # the longest phrase, with start and end


def test_one_folder_serves_the_detector_and_the_tracker(sam3_folder, settings, image):
    chosen = replace(
        settings, detector="sam3", sam_model_type="sam3", detector_model="", sam_checkpoint="", device="cpu"
    )
    official = Path(chosen.weights_dir) / "sam3"
    assert [location.path for location in detector_weights(chosen)] == [official]
    official.parent.mkdir(parents=True, exist_ok=True)
    official.symlink_to(sam3_folder)
    assert load_detector(chosen).name == "SAM 3"
    tracker = load_segmenter(chosen)
    (mask,) = tracker.decode(tracker.encode(image), [SegmentPrompt(points=[(120.0, 90.0)], point_labels=[1])])
    assert mask.mask.shape == image.shape[:2]


def test_a_folder_without_the_tokenizer_or_of_another_model_is_refused(sam3_folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "processor_config.json", "model.safetensors"):
        (bare / name).symlink_to(sam3_folder / name)
    with pytest.raises(WrongCheckpoint, match="tokenizer"):
        load_sam3_detector(bare, "cpu")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "owlv2"}')
    with pytest.raises(WrongCheckpoint, match="holds a 'owlv2' model; DETECTOR=sam3 reads"):
        load_sam3_detector(tmp_path / "other", "cpu")


def test_cached_detections_keep_their_masks(redis_url):
    rng = np.random.default_rng(0)
    masks = [rng.random((37, 53)) > 0.5, None]
    found = [Detection((1.0, 2.0, 30.0, 20.0), 0.5, 0, masks[0]), Detection((3.0, 4.0, 5.0, 6.0), 0.25, 1)]
    cache = DetectionCache(make_store(redis_url, 0), 60)
    cache.put("sam:det:test", "digest", found)
    (first, second) = cache.get("sam:det:test", "digest") or []
    assert first.box == found[0].box and first.score == 0.5 and np.array_equal(first.mask, masks[0])
    assert second.mask is None and second.phrase == 1
    assert np.array_equal(unpacked_mask(*packed_mask(masks[0])), masks[0])


def test_preannotation_brings_sam3s_masks_with_no_segmenter_pass(
    grounded_settings, sam3_folder, label_studio, media_root, caplog
):
    chosen = replace(grounded_settings, detector="sam3", detector_model=str(sam3_folder), box_threshold=0.0)
    client, predictor = make_client(chosen)
    detector = predictor.detector.get(120)
    decodes = []
    segmenter = predictor.models.get(1).segmenter
    segmenter.decode = lambda *args: decodes.append(args)  # type: ignore[method-assign]
    body = batch_body(label_studio)
    body["tasks"] = body["tasks"][3:4]  # the stand-in's car
    body["label_config"] = config_with('<Label value="Car"/><Label value="Wheel"/>')
    caplog.set_level(logging.INFO)
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    regions = response.json["results"][0]["result"]
    brushes = [region for region in regions if region["type"] == "brushlabels"]
    assert encodes_logged(caplog.records) == 0 and decodes == []
    # The masks are the detector's own, for its best boxes, each with its phrase's label.
    query = labels_query(parse_label_config(body["label_config"]))
    pixels = decode_image((media_root / "public/car_512x384_http.jpg").read_bytes(), 10**8)
    spans = list(query.spans)
    (expected,) = detector.detect([pixels], query.caption, spans, query.label_groups, 0.0, 0.0, chosen.max_objects)
    assert len(brushes) == len(expected) >= 2
    for region, detection in zip(brushes, expected, strict=True):
        assert region["value"]["brushlabels"] == [query.labels[detection.phrase]]
        assert np.array_equal(decode_brush(region), detection.mask)
        assert region["score"] == pytest.approx(detection.score, abs=1e-6)


def shared_settings(settings, sam3_folder, redis_url):
    """SAM 3's tracker and detector on one folder: they share the image encoder."""
    folder = str(sam3_folder)
    return replace(
        settings,
        redis_url=redis_url,
        sam_model_type="sam3",
        sam_checkpoint=folder,
        detector="sam3",
        detector_model=folder,
        box_threshold=0.0,
        max_objects=3,
        device="cpu",
    )


def widest_gap(scores: list[float]) -> float:
    """The middle of the widest gap between sorted scores: a threshold no float16 rounding moves a score across."""
    ordered = sorted(scores)
    gaps = [(high - low, (high + low) / 2) for low, high in zip(ordered, ordered[1:], strict=False)]
    return max(gaps)[1]


def mask_iou(first: np.ndarray, second: np.ndarray) -> float:
    return float((first & second).sum() / max((first | second).sum(), 1))


def test_detections_from_the_cached_float16_embedding_equal_those_from_the_image(
    settings, sam3_folder, redis_url, image
):
    chosen = shared_settings(settings, sam3_folder, redis_url)
    detector = load_detector(chosen)
    tracker = load_segmenter(chosen)
    assert isinstance(detector, Sam3Detector) and detector.shares_encoder
    assert tracker.identity.endswith("+backbone")
    store = make_store(redis_url, 0)
    store.set("test:sam3", serialize_embedding(tracker.encode(image)), 60)
    cached = deserialize_embedding(store.get("test:sam3") or b"")
    assert cached.extras["backbone"].dtype == np.float16 and cached.extras["backbone"].shape == (32, 72, 72)
    with torch.inference_mode():
        (answer,) = detector.score([image], CAPTION, SPANS, 0.0)
    threshold = widest_gap(answer.token_logits.max(dim=1).values.sigmoid().tolist())
    (direct,) = detector.detect([image], CAPTION, SPANS, GROUPS, threshold, 0.0, NO_CAP)
    (encoded,) = detector.detect([cached], CAPTION, SPANS, GROUPS, threshold, 0.0, NO_CAP)
    assert len(encoded) == len(direct) > 0
    for mine, theirs in zip(encoded, direct, strict=True):
        assert mine.phrase == theirs.phrase
        assert mine.score == pytest.approx(theirs.score, abs=0.01)
        assert mine.box == pytest.approx(theirs.box, abs=2.0)
        assert mine.mask is not None and theirs.mask is not None and mask_iou(mine.mask, theirs.mask) >= 0.95


def test_one_encode_serves_preannotation_clicks_and_text(
    settings, sam3_folder, redis_url, label_studio, media_root, caplog
):
    client, predictor = make_client(shared_settings(settings, sam3_folder, redis_url))
    detector = predictor.detector.get(120)
    passes = []  # the detector's own image encoder must never run: it reads the tracker's embeddings
    detector.model.vision_encoder.backbone.register_forward_hook(lambda *args: passes.append(1))
    caplog.set_level(logging.INFO)
    body = batch_body(label_studio)
    body["tasks"] = body["tasks"][3:4]
    batch = client.post("/predict", json=body)
    assert batch.status_code == 200, batch.json
    brushes = [region for region in batch.json["results"][0]["result"] if region["type"] == "brushlabels"]
    assert len(brushes) >= 2
    image_url = body["tasks"][0]["data"]["image"]
    click = interactive_on(image_url, "04-predict-interactive-keypoints.json")
    clicked = client.post("/predict", json=click)
    assert clicked.status_code == 200, clicked.json
    assert clicked.headers["X-Embedding-Cache"] == "hit"
    text = interactive_on(image_url, "06-predict-interactive-text.json")
    typed = client.post("/predict", json=text)
    assert typed.status_code == 200, typed.json
    assert typed.json["results"][0]["result"]
    assert encodes_logged(caplog.records) == 1 and passes == []


def interactive_on(image_url: str, name: str) -> dict:
    """A recorded interactive request, on another image."""
    body = recorded(name)
    body["tasks"][0]["data"]["image"] = image_url
    return body
