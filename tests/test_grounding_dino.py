"""GroundingDINO + SAM: text prompts and zero-click pre-annotation, replayed from Label Studio 1.23's payloads.

The real GroundingDINO architecture (the packaged SwinT OGC config, one encoder and one decoder layer)
with random weights and a tiny local BERT, saved in the official checkpoint format and loaded through the
backend's own loader.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from backend.cache.store import MemoryStore
from backend.errors import CheckpointMissing, PromptError
from backend.images import decode_image
from backend.inference.local import Predictor
from backend.models.base import SegmentPrompt
from backend.models.checkpoints import WEIGHTS_COMMAND
from backend.models.detector import BoxScores, normalised_to_pixels, select
from backend.models.grounding_dino import GroundingDino, bert_for_grounding_dino, load_grounding_dino
from backend.models.registry import MODEL_BUILD_LOCK, grounding_dino_checkpoint, load_detector
from backend.prompts.interactive import read_context
from backend.prompts.text import MAX_PHRASES, build_query, labels_query, text_query, thresholds_for
from backend.protocol.label_config import parse_label_config
from tests.assets import decode_brush, encodes_logged, recorded
from tests.conftest import make_client

LABEL_CONFIG = recorded("03-predict-batch.json")["label_config"]


def grounded_client(settings):
    client, predictor = make_client(settings)
    predictor.detector.get(120)
    return client, predictor


def config_with(labels_xml: str, extra: str = "") -> str:
    return (
        '<View><Image name="image" value="$image"/>'
        f'<BrushLabels name="tag" toName="image">{labels_xml}</BrushLabels>'
        f'<RectangleLabels name="tag3" toName="image">{labels_xml}</RectangleLabels>{extra}</View>'
    )


def batch_body(label_studio) -> dict:
    """The recorded "Retrieve predictions" request; its 4th image is served by the stand-in on an allowed host."""
    body = recorded("03-predict-batch.json")
    body["tasks"][3]["data"]["image"] = label_studio.url.replace("127.0.0.1", "localhost") + "/car_512x384_http.jpg"
    return body


def text_body(text: str | list[str], **value: object) -> dict:
    body = recorded("06-predict-interactive-text.json")
    item = body["params"]["context"]["result"][0]
    item["value"] = {"text": [text] if isinstance(text, str) else text, **value}
    return body


@pytest.fixture
def detector(grounding_dino_files) -> GroundingDino:
    return load_grounding_dino(
        grounding_dino_files.checkpoint, grounding_dino_files.config, grounding_dino_files.text_encoder, "cpu", 128
    )


# --- Prompts: captions, phrases and labels ---------------------------------------------------------------


def test_labels_become_one_caption_with_predicted_values_as_phrases():
    query = labels_query(parse_label_config(LABEL_CONFIG))
    assert query.caption == "car . wheel . tyre ."
    assert query.phrases == ("car", "wheel", "tyre")
    assert query.labels == ("Car", "Wheel", "Wheel")
    assert query.label_groups == [0, 1, 1]


def test_typed_phrases_find_their_labels():
    config = parse_label_config(LABEL_CONFIG)
    query = text_query(["red cars, Wheel: hubcap; tyres", "car"], config)
    assert query.phrases == ("red cars", "hubcap", "tyres", "car")
    assert query.labels == ("Car", "Wheel", "Wheel", "Car")
    assert text_query(["anything"], config, selected_label="Wheel").labels == ("Wheel",)
    single = parse_label_config(config_with('<Label value="Car"/>'))
    assert text_query(["blue sedan"], single).labels == ("Car",)


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([""], "empty"),
        (["  ", "\n"], "empty"),
        ([" , . ; "], "only separators"),
        (["zebra"], "names none of the labels"),
    ],
)
def test_bad_text_prompts_are_422_saying_why(texts, message):
    with pytest.raises(PromptError, match=message) as error:
        text_query(texts, parse_label_config(LABEL_CONFIG))
    assert error.value.status == 422


def test_the_number_of_phrases_is_bounded():
    with pytest.raises(PromptError, match=f"at most {MAX_PHRASES}") as error:
        build_query([(f"thing{index}", f"L{index}") for index in range(MAX_PHRASES + 1)])
    assert error.value.status == 413


def test_number_controls_override_the_environment_thresholds():
    config = parse_label_config(
        config_with('<Label value="Car"/>', '<Number name="box_threshold" toName="image" defaultValue="0.6"/>')
    )
    thresholds = thresholds_for(config, 0.3, 0.25)
    assert (thresholds.box, thresholds.text) == (0.6, 0.25)
    out_of_range = parse_label_config(
        config_with('<Label value="Car"/>', '<Number name="text_threshold" toName="image" defaultValue="2"/>')
    )
    with pytest.raises(PromptError, match="between 0 and 1"):
        thresholds_for(out_of_range, 0.3, 0.25)


# --- The detector: loading, phrase attribution, thresholds, NMS -------------------------------------------


def test_models_are_built_one_at_a_time(grounded_settings):
    # transformers patches torch.nn.Module in every thread while it builds BERT: a SAM built meanwhile would get
    # empty (meta) parameters. So every parameter of every model is made while the one build lock is held
    # (SAM loads first, then starts GroundingDINO's loading, so each registration below is its own loader's).
    lock_held = []
    hook = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, parameter: lock_held.append(MODEL_BUILD_LOCK.locked())
    )
    try:
        predictor = Predictor(grounded_settings, MemoryStore(1 << 26))
        predictor.models.start()
        models = (predictor.models.get(120).segmenter.sam, predictor.detector.get(120).model)
    finally:
        hook.remove()
    assert len(lock_held) > 100 and all(lock_held)
    for model in models:
        assert not any(parameter.is_meta for parameter in model.parameters())


def test_groundingdinos_bert_wrapper_computes_transformers_own_bert_forward(grounding_dino_files):
    """groundingdino-py's BertModelWarper, driving BertEncoderForGroundingDino under transformers 5, computes what
    transformers' own BertModel forward does for the same weights, tokens and padding mask; and the 3-D mask
    GroundingDINO builds keeps each phrase's tokens from seeing the others'."""
    from groundingdino.models.GroundingDINO.bertwarper import BertModelWarper
    from transformers import AutoTokenizer, BertModel

    folder = grounding_dino_files.text_encoder
    ours = BertModelWarper(bert_model=bert_for_grounding_dino().from_pretrained(folder).eval())
    library = BertModel.from_pretrained(folder).eval()
    tokens = AutoTokenizer.from_pretrained(folder)(["car . red sedan .", "tyre ."], padding=True, return_tensors="pt")
    with torch.inference_mode():
        wrapped = ours(**tokens)["last_hidden_state"]
        reference = library(**tokens).last_hidden_state
    attended = tokens["attention_mask"].bool()
    assert not attended.all()  # the second caption is padded
    torch.testing.assert_close(wrapped[attended], reference[attended], atol=1e-5, rtol=1e-5)
    # Two blocks, [CLS] car . | red sedan . [SEP]: changing a token of the second leaves the first's outputs alone.
    ids = tokens["input_ids"][:1].clone()
    length = ids.shape[1]
    block = torch.zeros(1, length, length, dtype=torch.bool)
    block[0, :3, :3] = block[0, 3:, 3:] = True
    other = ids.clone()
    other[0, 4] = tokens["input_ids"][1, 1]  # "sedan" becomes "tyre"
    with torch.inference_mode():
        first = ours(input_ids=ids, attention_mask=block)["last_hidden_state"]
        changed = ours(input_ids=other, attention_mask=block)["last_hidden_state"]
    torch.testing.assert_close(first[0, :3], changed[0, :3])
    assert not torch.allclose(first[0, 3:], changed[0, 3:])


def test_missing_checkpoint_names_the_setting_the_file_and_the_download_command(settings):
    with pytest.raises(CheckpointMissing) as error:
        load_detector(settings)
    expected = Path(settings.weights_dir) / "groundingdino_swint_ogc.pth"
    message = str(error.value)
    assert str(expected) in message and "GROUNDING_DINO_CHECKPOINT" in message and WEIGHTS_COMMAND in message


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, grounding_dino_files):
    state = torch.load(grounding_dino_files.checkpoint, weights_only=True)["model"]
    partial = {key: value for key, value in state.items() if not key.startswith("transformer.decoder")}
    path = tmp_path / "partial.pth"
    torch.save({"model": partial}, path)
    with pytest.raises(ValueError, match="does not match"):
        load_grounding_dino(path, grounding_dino_files.config, grounding_dino_files.text_encoder)


def crafted_scores(detector: GroundingDino, caption: str, peaks: list[dict[str, float]]) -> torch.Tensor:
    """Token scores for one query per entry of `peaks` ({word: score}), zero elsewhere."""
    encoding = detector.tokenizer(caption)
    tokens = detector.tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    scores = torch.zeros(len(peaks), len(tokens))
    for query, words in enumerate(peaks):
        for word, score in words.items():
            scores[query, tokens.index(word)] = score
    return scores


def answer(scores: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> BoxScores:
    """Token scores and normalised cx, cy, w, h boxes as a model's answer for an image of `image_size`."""
    return BoxScores(scores.double().logit(), normalised_to_pixels(boxes, image_size))


def test_boxes_go_to_the_phrase_their_tokens_match_under_both_thresholds(detector):
    query = build_query([("car", "Car"), ("red sedan", "Car"), ("tyre", "Wheel")])
    membership = detector.phrase_tokens(query.caption, list(query.spans))
    groups = torch.as_tensor(query.label_groups)
    scores = crafted_scores(
        detector,
        query.caption,
        [{"tyre": 0.9}, {"car": 0.35, "tyre": 0.2}, {"red": 0.9}, {"car": 0.2}, {"red": 0.9, "sedan": 0.9}],
    )
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1], [0.3, 0.7, 0.1, 0.1]])
    boxes = torch.cat([boxes, torch.tensor([[0.8, 0.2, 0.1, 0.1]])])
    found = select((100, 200), answer(scores, boxes, (100, 200)), membership, groups, 0.3, 0.25)
    by_phrase = {query.phrases[detection.phrase]: detection for detection in found}
    # Query 3 is under the box threshold; query 2 matched half of "red sedan" (mean 0.45 > 0.25).
    assert set(by_phrase) == {"tyre", "car", "red sedan"} and len(found) == 4
    assert query.labels[by_phrase["tyre"].phrase] == "Wheel"
    assert by_phrase["tyre"].box == pytest.approx((30.0, 15.0, 50.0, 25.0))
    assert found[0].score == pytest.approx(0.9) and found[-1].score == pytest.approx(0.35)
    strict_text = select((100, 200), answer(scores, boxes, (100, 200)), membership, groups, 0.3, 0.5)
    # "car" at 0.35 and "red" alone (mean 0.45 over "red sedan") fall under a text threshold of 0.5.
    assert [query.phrases[detection.phrase] for detection in strict_text] == ["tyre", "red sedan"]


def test_overlapping_boxes_are_merged_within_a_label_only(detector):
    query = build_query([("car", "Car"), ("sedan", "Car"), ("tyre", "Wheel")])
    membership = detector.phrase_tokens(query.caption, list(query.spans))
    scores = crafted_scores(detector, query.caption, [{"car": 0.9}, {"sedan": 0.8}, {"tyre": 0.7}])
    same_place = torch.tensor([[0.5, 0.5, 0.4, 0.4]] * 3)
    found = select(
        (100, 100), answer(scores, same_place, (100, 100)), membership, torch.as_tensor(query.label_groups), 0.3, 0.25
    )
    assert [query.labels[detection.phrase] for detection in found] == ["Car", "Wheel"]


def test_detect_runs_the_model_on_a_batch_and_caps_the_boxes(detector, media_root):
    images = [
        decode_image((media_root / "upload/1/voc.jpg").read_bytes(), 10**8),
        decode_image((media_root / "upload/1/e0d87ad7-car_640x480.jpg").read_bytes(), 10**8),
    ]
    query = labels_query(parse_label_config(LABEL_CONFIG))
    batches = []
    detector.model.register_forward_pre_hook(lambda module, inputs: batches.append(inputs[0].tensors.shape[0]))
    args = (query.caption, list(query.spans), query.label_groups)
    capped = detector.detect(images, *args, box_threshold=0.0, text_threshold=0.0, max_objects=7, batch_size=2)
    assert batches == [2]
    for image, found in zip(images, capped, strict=True):
        assert len(found) == 7
        assert [d.score for d in found] == sorted((d.score for d in found), reverse=True)
        height, width = image.shape[:2]
        for detection in found:
            x0, y0, x1, y1 = detection.box
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            assert query.phrases[detection.phrase] in ("car", "wheel", "tyre")
    # Scores are sigmoids: none exceeds 1, so a box threshold of 1 lets nothing through.
    assert detector.detect(images, *args, box_threshold=1.0, text_threshold=0.0, max_objects=7) == [[], []]


# --- Through /predict: pre-annotation and interactive text ------------------------------------------------


def assert_object_pairs(entry: dict, width: int, height: int) -> list[tuple[dict, dict]]:
    """Every object is a brush region followed by its rectangle: same label, same score."""
    regions = entry["result"]
    assert len(regions) % 2 == 0
    pairs = list(zip(regions[0::2], regions[1::2], strict=True))
    for brush, rectangle in pairs:
        assert brush["type"] == "brushlabels" and rectangle["type"] == "rectanglelabels"
        assert (brush["from_name"], rectangle["from_name"]) == ("tag", "tag3")
        assert brush["value"]["brushlabels"] == rectangle["value"]["rectanglelabels"]
        assert brush["value"]["brushlabels"][0] in ("Car", "Wheel")
        assert brush["score"] == rectangle["score"] and 0.0 <= brush["score"] <= 1.0
        assert (brush["original_width"], brush["original_height"]) == (width, height)
        assert decode_brush(brush).shape == (height, width)  # Label Studio's RLE, decoded back
        box = rectangle["value"]
        assert 0 <= box["x"] and box["x"] + box["width"] <= 100 + 1e-6
        assert 0 <= box["y"] and box["y"] + box["height"] <= 100 + 1e-6
    if pairs:
        assert entry["score"] == pytest.approx(min(brush["score"] for brush, _ in pairs))
    return pairs


def test_preannotation_batch_detects_and_encodes_all_images_at_once_and_segments_each_in_one_call(
    grounded_settings, label_studio
):
    # Four images per encoder pass, as on a GPU (on CPU the default is one).
    # Random-weight masks are ragged enough to pass MAX_ANSWER_BYTES (tests/test_answer_size.py): every object is
    # answered here, so that the answer's objects are the boxes SAM decoded.
    client, predictor = grounded_client(replace(grounded_settings, sam_encoder_batch=4, max_answer_bytes=10**9))
    detector, segmenter = predictor.detector.get(1), predictor.models.get(1).segmenter
    # A process's first batch takes one image alone until every step's time is measured (deadline.StepTimes):
    # another image measures them first, as on a backend that has answered before.
    warm_up = batch_body(label_studio)
    warm_up["tasks"] = warm_up["tasks"][:1]
    warm_up["tasks"][0]["data"]["image"] = "/data/upload/1/voc.jpg"
    assert client.post("/predict", json=warm_up).status_code == 200
    batches, encodes, decodes = [], [], []
    detector.model.register_forward_pre_hook(lambda module, inputs: batches.append(inputs[0].tensors.shape[0]))
    segmenter.sam.image_encoder.register_forward_pre_hook(lambda module, inputs: encodes.append(inputs[0].shape[0]))
    original_run = segmenter.decoder.run

    def counting_run(*arrays):
        decodes.append(arrays[1].shape[0])  # prompts decoded in this call
        return original_run(*arrays)

    segmenter.decoder.run = counting_run
    body = batch_body(label_studio)
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert len(results) == 4 and "errors" not in response.json
    # One SAM encoder pass for the four tasks; GroundingDINO reads the three 4:3 images in one pass and the 3:4 one
    # (EXIF-rotated) in another, since a padded batch would change their boxes (tests/test_detectors.py).
    assert batches == [3, 1] and encodes == [4]
    sizes = [(1024, 768), (640, 480), (300, 400), (512, 384)]  # the third is shown EXIF-rotated
    counts = [len(assert_object_pairs(entry, *size)) for entry, size in zip(results, sizes, strict=True)]
    assert all(0 < count <= 3 for count in counts)
    assert decodes == counts  # SAM decoded every box of an image in one call
    assert all(entry["model_version"] for entry in results)


def test_a_preannotated_image_is_clicked_from_the_cached_embedding(grounded_settings, caplog):
    client, _ = grounded_client(grounded_settings)
    caplog.set_level(logging.INFO, logger="backend.cache.embeddings")
    batch = recorded("03-predict-batch.json")
    batch["tasks"] = batch["tasks"][:1]
    first = client.post("/predict", json=batch)
    assert first.status_code == 200 and first.headers["X-Embedding-Cache"] == "miss"
    click = client.post("/predict", json=recorded("04-predict-interactive-keypoints.json"))
    assert click.status_code == 200, click.json
    assert click.headers["X-Embedding-Cache"] == "hit"
    assert encodes_logged(caplog.records) == 1


def test_one_bad_image_in_a_batch_fails_alone(grounded_settings, label_studio):
    client, predictor = grounded_client(replace(grounded_settings, grounding_dino_batch=3))
    batches = []
    predictor.detector.get(1).model.register_forward_pre_hook(
        lambda module, inputs: batches.append(inputs[0].tensors.shape[0])
    )
    body = batch_body(label_studio)
    body["tasks"][1]["data"]["image"] = "/data/upload/1/missing.jpg"
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    # Tasks go GROUNDING_DINO_BATCH at a time and the missing image is not searched: the first chunk's other two
    # images (4:3, and 3:4 as shown EXIF-rotated) take a pass each, since a padded batch would change their boxes
    # (tests/test_detectors.py); the second chunk is task 4 alone.
    assert batches == [1, 1, 1]
    results = response.json["results"]
    # The failed task answers [], so Label Studio stores nothing for it and asks again next time.
    assert results[1] == [] and all(results[i]["result"] for i in (0, 2, 3))
    assert [error["index"] for error in response.json["errors"]] == [1]


def test_labels_without_detections_give_an_empty_valid_prediction(grounded_settings, label_studio):
    client, _ = grounded_client(grounded_settings)
    body = batch_body(label_studio)
    body["label_config"] = body["label_config"].replace(
        "</View>", '<Number name="box_threshold" toName="image" defaultValue="1"/></View>'
    )
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    assert [entry["result"] for entry in response.json["results"]] == [[]] * 4
    assert all(entry["score"] == 0.0 for entry in response.json["results"])


def test_rectangle_only_projects_get_boxes_without_sam(grounded_settings, caplog):
    client, _ = grounded_client(grounded_settings)
    caplog.set_level(logging.INFO, logger="backend.cache.embeddings")
    body = recorded("03-predict-batch.json")
    body["tasks"] = body["tasks"][:2]
    body["label_config"] = (
        '<View><Image name="image" value="$image"/><RectangleLabels name="boxes" toName="image">'
        '<Label value="Car"/></RectangleLabels></View>'
    )
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    regions = [region for entry in response.json["results"] for region in entry["result"]]
    assert regions and {region["type"] for region in regions} == {"rectanglelabels"}
    assert encodes_logged(caplog.records) == 0


def test_configs_without_brush_polygon_or_rectangle_and_huge_label_sets_are_refused(grounded_settings):
    client, _ = grounded_client(grounded_settings)
    body = recorded("03-predict-batch.json")
    body["label_config"] = (
        '<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/>'
        "</Choices></View>"
    )
    refused = client.post("/predict", json=body)
    assert refused.status_code == 422 and "no BrushLabels, PolygonLabels or RectangleLabels" in refused.json["error"]
    body["label_config"] = config_with("".join(f'<Label value="Label{index}"/>' for index in range(200)))
    huge = client.post("/predict", json=body)
    assert huge.status_code == 413 and f"at most {MAX_PHRASES}" in huge.json["error"]
    wordy = "".join(
        f'<Label value="L{index}" predicted_values="{"a very long winded description " * 3}{index}"/>'
        for index in range(12)
    )
    body["label_config"] = config_with(wordy)
    too_long = client.post("/predict", json=body)
    assert too_long.status_code == 413 and "GroundingDINO reads at most 256" in too_long.json["error"]


def test_interactive_text_segments_what_it_names(grounded_settings):
    client, _ = grounded_client(grounded_settings)
    response = client.post("/predict", json=recorded("06-predict-interactive-text.json"))
    assert response.status_code == 200, response.json
    (entry,) = response.json["results"]
    pairs = assert_object_pairs(entry, 1024, 768)
    assert pairs and {brush["value"]["brushlabels"][0] for brush, _ in pairs} == {"Car"}
    hubcaps = client.post("/predict", json=text_body("Wheel: hubcap"))
    assert {region["value"]["brushlabels"][0] for region in hubcaps.json["results"][0]["result"][0::2]} == {"Wheel"}
    chosen = client.post("/predict", json=text_body("shiny thing", brushlabels=["Wheel"]))
    assert chosen.status_code == 200, chosen.json
    assert {region["value"]["brushlabels"][0] for region in chosen.json["results"][0]["result"][0::2]} == {"Wheel"}


@pytest.mark.parametrize(("text", "message"), [("", "empty"), (" , ; ", "only separators"), ("zebra", "names none")])
def test_bad_interactive_text_is_422(grounded_settings, text, message):
    client, _ = grounded_client(grounded_settings)
    response = client.post("/predict", json=text_body(text))
    assert response.status_code == 422 and message in response.json["error"]


def test_without_grounding_dino_clicks_work_and_text_says_what_is_missing(settings, redis_url):
    client, predictor = make_client(replace(settings, redis_url=redis_url))
    with pytest.raises(Exception, match="not found"):
        predictor.detector.get(60)
    click = client.post("/predict", json=recorded("04-predict-interactive-keypoints.json"))
    assert click.status_code == 200 and click.json["results"][0]["result"]
    expected = str(grounding_dino_checkpoint(settings).path)
    for body in (recorded("03-predict-batch.json"), recorded("06-predict-interactive-text.json")):
        response = client.post("/predict", json=body)
        assert response.status_code == 503
        assert "GroundingDINO" in response.json["error"] and expected in response.json["error"]
        assert WEIGHTS_COMMAND in response.json["error"]
    health = client.get("/health").json
    assert health["models"] == "ready" and health["detector"] == "failed" and expected in health["detector_error"]


def test_a_text_prompt_without_grounding_dino_is_refused_before_its_image_is_fetched(settings):
    """A text prompt cannot be answered without GroundingDINO: say so at once, not after fetching and encoding the
    image (31-37 s on a CPU with ViT-H)."""
    client, predictor = make_client(settings)
    with pytest.raises(Exception, match="not found"):
        predictor.detector.get(60)
    body = recorded("06-predict-interactive-text.json")
    body["tasks"][0]["data"]["image"] = "/data/upload/1/no-such-image.jpg"  # fetching it would answer a 4xx
    response = client.post("/predict", json=body)
    assert response.status_code == 503 and "GroundingDINO" in response.json["error"]


def test_a_worker_without_grounding_dino_refuses_a_text_prompt_before_encoding_its_image(settings, caplog):
    """In queue mode the web tier cannot know that a worker's GroundingDINO failed: the worker must not encode."""
    _, predictor = make_client(settings)
    caplog.set_level(logging.INFO, logger="backend.cache.embeddings")
    with pytest.raises(Exception, match="not found"):
        predictor.detector.get(60)
    body = recorded("06-predict-interactive-text.json")
    image_url = recorded("06-predict-interactive-text.json")["tasks"][0]["data"]["image"]
    image = predictor.fetcher.fetch(image_url)
    config = parse_label_config(body["label_config"])
    text_prompts = read_context(body["params"]["context"], settings.max_prompts_per_task)
    with pytest.raises(PromptError, match="GroundingDINO") as refused:
        predictor.predict_for_image(image, 1, text_prompts, None, config)
    assert refused.value.status == 503
    assert encodes_logged(caplog.records) == 0


def test_segmentation_masks_follow_the_boxes(grounded_settings):
    """With every box decoded from the cached embedding, each mask is the SAM answer to that box."""
    client, predictor = grounded_client(grounded_settings)
    response = client.post("/predict", json=recorded("06-predict-interactive-text.json"))
    pairs = assert_object_pairs(response.json["results"][0], 1024, 768)
    models = predictor.models.get(1)
    image = predictor.fetcher.fetch(recorded("06-predict-interactive-text.json")["tasks"][0]["data"]["image"])
    embedding = models.embeddings.lookup(image.digest)
    for brush, rectangle in pairs:
        box = rectangle["value"]
        pixels = (
            box["x"] * 10.24,
            box["y"] * 7.68,
            (box["x"] + box["width"]) * 10.24,
            (box["y"] + box["height"]) * 7.68,
        )
        (expected,) = models.segmenter.decode(embedding, [SegmentPrompt(box=pixels)])
        assert np.mean(decode_brush(brush) == expected.mask) > 0.99
