"""The Label Studio wire format, replayed from what Label Studio 1.23 really sent (tests/fixtures/ls-protocol)."""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from backend.cache.store import MemoryStore
from backend.http.server import create_app
from backend.inference.local import Predictor
from backend.models.loader import BackgroundLoader
from backend.project_files import ProjectFiles
from backend.training.dataset import AnnotationRecord, Region, TrainingSet
from backend.training.ingest import Inbox, last_training
from tests.assets import decode_brush, recorded
from tests.conftest import make_client


def interactive(name: str, image: str | None = None) -> dict:
    body = recorded(name)
    if image is not None:
        body["tasks"][0]["data"]["image"] = image
    return body


def assert_brush_results(results: list[dict], width: int, height: int, label: str) -> list[np.ndarray]:
    masks = []
    for result in results:
        assert result["type"] == "brushlabels"
        assert result["from_name"] == "tag" and result["to_name"] == "image"
        assert isinstance(result["id"], str) and result["id"]
        assert (result["original_width"], result["original_height"]) == (width, height)
        assert result["value"]["brushlabels"] == [label]
        assert isinstance(result["score"], float)
        mask = decode_brush(result)
        assert mask.shape == (height, width)
        masks.append(mask)
    return masks


def test_health_and_setup_answer_while_models_load(settings):
    release = threading.Event()
    predictor = Predictor(settings, MemoryStore(1 << 20))
    predictor.models = BackgroundLoader(lambda: release.wait(30))
    client = create_app(settings, predictor).test_client()
    started = time.perf_counter()
    health = client.get("/health")
    setup = client.post("/setup", json=recorded("02-setup.json"))
    elapsed = time.perf_counter() - started
    release.set()
    assert health.status_code == 200 and health.json["status"] == "UP"
    assert health.json["model_class"] == "SamBackend" and health.json["models"] == "loading"
    assert setup.status_code == 200 and setup.json["model_version"]
    assert elapsed < 1.0


def test_predict_while_models_load_is_503_with_retry_advice(settings):
    release = threading.Event()
    predictor = Predictor(replace(settings, model_ready_timeout_s=0.2), MemoryStore(1 << 20))
    predictor.models = BackgroundLoader(lambda: release.wait(30))
    client = create_app(settings, predictor).test_client()
    response = client.post("/predict", json=interactive("04-predict-interactive-keypoints.json"))
    release.set()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert "loading" in response.json["error"]


def test_interactive_keypoints_return_one_brush_mask(client):
    response = client.post("/predict", json=interactive("04-predict-interactive-keypoints.json"))
    assert response.status_code == 200, response.json
    (entry,) = response.json["results"]
    assert entry["model_version"]
    (mask,) = assert_brush_results(entry["result"], 1024, 768, "Car")
    assert entry["score"] == entry["result"][0]["score"]
    assert 0 < mask.sum() < mask.size


def test_interactive_rectangle_returns_brush_mask_and_no_duplicate_rectangle(client):
    response = client.post("/predict", json=interactive("05-predict-interactive-rectangle.json"))
    assert response.status_code == 200, response.json
    assert_brush_results(response.json["results"][0]["result"], 1024, 768, "Car")


def test_several_rectangles_give_one_mask_each(client):
    body = interactive("05-predict-interactive-rectangle.json")
    second = dict(body["params"]["context"]["result"][0], id="second")
    second["value"] = dict(second["value"], x=5.0, y=5.0, width=10.0, height=10.0)
    body["params"]["context"]["result"].append(second)
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    masks = assert_brush_results(response.json["results"][0]["result"], 1024, 768, "Car")
    assert len(masks) == 2 and not np.array_equal(masks[0], masks[1])


def test_batch_without_context_is_preannotation_which_needs_grounding_dino(client):
    # Pre-annotation itself is tested in test_grounding_dino.py; these settings have no GroundingDINO weights.
    response = client.post("/predict", json=recorded("03-predict-batch.json"))
    assert response.status_code == 503
    assert "GroundingDINO" in response.json["error"] and "weights download" in response.json["error"]


@pytest.mark.parametrize("context", [{}, {"result": []}])
def test_empty_interactive_context_is_an_empty_prediction(client, context):
    body = interactive("04-predict-interactive-keypoints.json")
    body["params"]["context"] = context
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    assert response.json["results"] == [{"result": [], "score": 0.0, "model_version": "sam-vit_b"}]


@pytest.mark.parametrize(
    "name",
    [
        "07-webhook-annotation-created.json",
        "08-webhook-annotation-updated.json",
        "09-webhook-annotations-deleted.json",
        "10-webhook-start-training.json",
    ],
)
def test_webhooks_answer_200_at_once_and_their_events_are_recorded_and_applied(settings, redis_url, name):
    """Each recorded webhook of project 1, which holds annotation 1 (the one the recordings create, update and
    delete): answered within Label Studio's 1 s, then applied in the background."""
    client, predictor = make_client(replace(settings, redis_url=redis_url))
    files = ProjectFiles(settings.model_dir, 1)
    training_set = TrainingSet(files)
    training_set.put(
        AnnotationRecord(1, 1, "/data/upload/1/x.png", [Region.of_mask("r", "Car", np.ones((4, 4), bool))])
    )
    body = recorded(name)
    started = time.perf_counter()
    response = client.post("/webhook", json=body)
    assert response.status_code == 200
    assert time.perf_counter() - started < 1.0
    assert response.json == {"status": "queued", "action": body["action"], "project": 1}
    assert predictor.learning.wait_idle(60)
    assert not Inbox(files).pending() and not files.failed.exists()
    if body["action"] == "START_TRAINING":
        assert last_training(files)["status"] == "skipped"  # one task: too few to hold any out
    else:
        # Created and updated: the recordings' RLE is cut short, so the region is rejected and the annotation,
        # left with no region, dropped; deleted: dropped.
        assert training_set.summary()["annotations"] == 0
    if body["action"] in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        (rejection,) = training_set.rejections()
        assert (rejection["annotation"], rejection["region"]) == (1, "7248e69e40")
        assert rejection["reason"] == "rle is not a list of byte values"


def test_exif_orientation_gives_the_size_label_studio_shows(client):
    body = interactive("05-predict-interactive-rectangle.json", "/data/upload/1/a5529614-car_400x300_exif6.png")
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    # Stored 400x300 with Orientation=6: shown (and masked) as 300 wide, 400 high.
    assert_brush_results(response.json["results"][0]["result"], 300, 400, "Car")


def test_image_on_an_allowed_other_host_is_fetched_without_credentials(client, label_studio):
    other_host = label_studio.url.replace("127.0.0.1", "localhost") + "/car_512x384_http.jpg"
    response = client.post("/predict", json=interactive("04-predict-interactive-keypoints.json", other_host))
    assert response.status_code == 200, response.json
    assert_brush_results(response.json["results"][0]["result"], 512, 384, "Car")
    method, path, scheme = label_studio.requests[-1]
    assert path.startswith("/car_512x384_http.jpg") and scheme == ""


def test_local_files_are_read_under_the_document_root_only(settings, media_root):
    client, _ = make_client(replace(settings, local_files_document_root=str(media_root / "local")))
    ok = client.post(
        "/predict",
        json=interactive("04-predict-interactive-keypoints.json", "/data/local-files/?d=e2e/car_320x240_local.jpg"),
    )
    assert ok.status_code == 200, ok.json
    assert_brush_results(ok.json["results"][0]["result"], 320, 240, "Car")
    escape = client.post(
        "/predict",
        json=interactive("04-predict-interactive-keypoints.json", "/data/local-files/?d=../upload/1/voc.jpg"),
    )
    assert escape.status_code == 403 and "outside" in escape.json["error"]


def test_personal_access_token_is_exchanged_and_reused(settings, label_studio):
    from tests.label_studio_standin import make_personal_access_token

    client, _ = make_client(replace(settings, label_studio_api_key=make_personal_access_token()))
    before = label_studio.refreshes
    for _ in range(3):
        response = client.post("/predict", json=interactive("04-predict-interactive-keypoints.json"))
        assert response.status_code == 200, response.json
    assert label_studio.refreshes == before + 1
    assert label_studio.requests[-1][2] == "Bearer"


def test_personal_access_token_is_exchanged_again_once_the_access_token_expires(settings, label_studio):
    from tests.label_studio_standin import make_personal_access_token

    client, _ = make_client(replace(settings, label_studio_api_key=make_personal_access_token()))
    label_studio.access_lifetime_s = 3
    try:
        before = label_studio.refreshes
        first = client.post("/predict", json=interactive("04-predict-interactive-keypoints.json"))
        time.sleep(3.2)  # past the access token's `exp`, whole seconds at most 3 after it was issued
        second = client.post("/predict", json=interactive("04-predict-interactive-keypoints.json"))
    finally:
        label_studio.access_lifetime_s = 300
    assert first.status_code == 200 and second.status_code == 200, (first.json, second.json)
    assert label_studio.refreshes == before + 2


def test_access_token_refused_before_it_expires_is_exchanged_again(settings, label_studio):
    from tests.label_studio_standin import make_personal_access_token

    client, _ = make_client(replace(settings, label_studio_api_key=make_personal_access_token()))
    before = label_studio.refreshes
    assert client.post("/predict", json=interactive("04-predict-interactive-keypoints.json")).status_code == 200
    label_studio.revoke_access_tokens()
    response = client.post("/predict", json=interactive("04-predict-interactive-keypoints.json"))
    assert response.status_code == 200, response.json
    assert label_studio.refreshes == before + 2
    assert [scheme for method, path, scheme in label_studio.requests[-3:]] == ["Bearer", "", "Bearer"]


@pytest.mark.parametrize(
    "key_kind, reason",
    [("signed by another Label Studio", "HTTP 401"), ("expired", "API key has expired")],
)
def test_personal_access_token_refused_says_to_check_the_key(settings, label_studio, key_kind, reason):
    from tests.label_studio_standin import make_personal_access_token

    key = (
        make_personal_access_token(secret="signing-key-of-another-label-studio-instance")
        if key_kind.startswith("signed")
        else make_personal_access_token(lifetime_s=-60)
    )
    client, _ = make_client(replace(settings, label_studio_api_key=key))
    response = client.post("/predict", json=interactive("04-predict-interactive-keypoints.json"))
    assert response.status_code == 422
    error = response.json["error"]
    assert "refused the personal access token" in error and reason in error and "LABEL_STUDIO_API_KEY" in error


def test_unreachable_label_studio_says_the_key_could_not_be_exchanged(settings):
    from tests.label_studio_standin import make_personal_access_token
    from tests.services import free_port

    nowhere = f"http://127.0.0.1:{free_port()}"
    client, _ = make_client(
        replace(settings, label_studio_url=nowhere, label_studio_api_key=make_personal_access_token())
    )
    response = client.post("/predict", json=interactive("04-predict-interactive-keypoints.json"))
    assert response.status_code == 422
    assert f"could not exchange the personal access token at {nowhere}/api/token/refresh/" in response.json["error"]


def test_label_studio_under_a_sub_path_is_asked_for_tokens_under_it(label_studio):
    from backend.errors import AuthError
    from backend.protocol.auth import LabelStudioCredentials
    from tests.label_studio_standin import make_personal_access_token

    credentials = LabelStudioCredentials(label_studio.url + "/ls", make_personal_access_token(), timeout_s=10)
    with pytest.raises(AuthError, match="could not exchange"):  # the stand-in serves nothing under /ls/
        credentials.header()
    assert label_studio.requests[-1][:2] == ("POST", "/ls/api/token/refresh/?")


def test_sdk_authorization_is_token_for_legacy_keys_and_bearer_for_personal_access_tokens(label_studio):
    import jwt
    from label_studio_sdk import LabelStudio

    from backend.protocol.auth import sdk_authorization
    from tests.label_studio_standin import SECRET, make_personal_access_token

    legacy = LabelStudio(base_url=label_studio.url, api_key=label_studio.legacy_token)
    assert sdk_authorization(legacy) == f"Token {label_studio.legacy_token}"
    personal = LabelStudio(base_url=label_studio.url, api_key=make_personal_access_token())
    before = label_studio.refreshes
    first, second = sdk_authorization(personal), sdk_authorization(personal)
    assert first == second and first.startswith("Bearer ")
    assert jwt.decode(first.removeprefix("Bearer "), SECRET, algorithms=["HS256"])["token_type"] == "access"
    assert label_studio.refreshes == before + 1


def test_legacy_token_refused_says_to_check_the_key(settings, label_studio):
    client, _ = make_client(settings)
    label_studio.legacy_enabled = False
    try:
        response = client.post("/predict", json=interactive("04-predict-interactive-keypoints.json"))
    finally:
        label_studio.legacy_enabled = True
    assert response.status_code == 422
    assert "401" in response.json["error"] and "LABEL_STUDIO_API_KEY" in response.json["error"]


def test_basic_auth_guards_every_route(settings):
    client, _ = make_client(replace(settings, basic_auth_user="ls", basic_auth_pass="s3cret"))
    good = "Basic " + base64.b64encode(b"ls:s3cret").decode()
    bad = "Basic " + base64.b64encode(b"ls:wrong").decode()
    for method, path, body in [
        ("get", "/health", None),
        ("post", "/setup", recorded("02-setup.json")),
        ("post", "/predict", recorded("04-predict-interactive-keypoints.json")),
        ("post", "/webhook", recorded("10-webhook-start-training.json")),
    ]:
        call = getattr(client, method)
        assert call(path, json=body).status_code == 401
        denied = call(path, json=body, headers={"Authorization": bad})
        assert denied.status_code == 401 and "s3cret" not in denied.get_data(as_text=True)
        assert call(path, json=body, headers={"Authorization": good}).status_code == 200


def test_the_shipped_label_config_is_what_the_backend_expects():
    from backend.protocol.label_config import parse_label_config
    from tests.assets import REPO

    config = parse_label_config((REPO / "label_config.xml").read_text())
    assert config.image_field == "image" and config.brush is not None
    assert config.keypoint is not None and config.rectangle is not None and config.text_prompt is not None
    assert set(config.keypoint.labels) == set(config.brush.labels) == set(config.rectangle.labels)


def test_a_click_whose_predicted_iou_is_negative_scores_zero(settings, redis_url, tmp_path):
    """SAM's IoU head is unbounded; Label Studio sorts tasks by the score, which elsewhere is in 0-1."""
    import torch

    from tests.assets import build_small_sam

    sam = build_small_sam()
    last = sam.mask_decoder.iou_prediction_head.layers[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, -0.2)  # every mask's predicted IoU: -0.2, as seen from a trained SAM
    checkpoint = tmp_path / "sam_negative_iou.pth"
    torch.save(sam.state_dict(), checkpoint)
    client, _ = make_client(replace(settings, sam_checkpoint=str(checkpoint), redis_url=redis_url))
    response = client.post("/predict", json=interactive("04-predict-interactive-keypoints.json"))
    assert response.status_code == 200, response.json
    (entry,) = response.json["results"]
    assert entry["result"] and entry["score"] == 0.0
    assert all(result["score"] == 0.0 for result in entry["result"])
