"""Every bad input gets a 4xx JSON error, and the server keeps serving afterwards."""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from PIL import Image

from tests.assets import encodes_logged, recorded
from tests.conftest import make_client
from tests.test_gunicorn import ProjectApiStandIn, run_ended

CONFIG_WITHOUT_BRUSH = (
    '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
    '<Label value="Car"/></KeyPointLabels></View>'
)


def keypoints_body(image: str | None = None) -> dict:
    body = recorded("04-predict-interactive-keypoints.json")
    if image is not None:
        body["tasks"][0]["data"]["image"] = image
    return body


def big_png(width: int, height: int) -> bytes:
    """A small file that declares a huge image: a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def bad_files(media_root):
    (media_root / "upload" / "1" / "bomb.png").write_bytes(big_png(10000, 10000))
    (media_root / "upload" / "1" / "not-an-image.jpg").write_bytes(b"<html>login page</html>")
    return media_root


def mutate(change) -> dict:
    body = keypoints_body()
    change(body)
    return body


BAD_BODIES = {
    "no tasks": lambda b: b.pop("tasks"),
    "tasks not a list": lambda b: b.update(tasks="x"),
    "empty tasks": lambda b: b.update(tasks=[]),
    "task without data": lambda b: b["tasks"][0].pop("data"),
    "task without image": lambda b: b["tasks"][0]["data"].pop("image"),
    "image not a string": lambda b: b["tasks"][0]["data"].update(image=12),
    "no label config": lambda b: b.pop("label_config"),
    "label config not XML": lambda b: b.update(label_config="<View><Image"),
    "label config without image": lambda b: b.update(label_config="<View><Text name='t' value='$t'/></View>"),
    "label config without brush": lambda b: b.update(label_config=CONFIG_WITHOUT_BRUSH),
    "params not an object": lambda b: b.update(params=[1]),
    "context not an object": lambda b: b["params"].update(context="click"),
    "point outside the image": lambda b: b["params"]["context"]["result"][0]["value"].update(x=130.0),
    "label not in brush control": lambda b: [
        item["value"].update(keypointlabels=["Truck"], labels=["Truck"]) for item in b["params"]["context"]["result"]
    ],
    "region not a smart prompt": lambda b: b["params"]["context"]["result"][0].update(type="polygonlabels"),
    "image rotation not a number": lambda b: b["params"]["context"]["result"][0].update(image_rotation="90deg"),
    "text naming no label": lambda b: b["params"]["context"]["result"].append(
        {"type": "textarea", "value": {"text": ["zebra"]}}
    ),
    "unsupported URL scheme": lambda b: b["tasks"][0]["data"].update(image="ftp://example.com/a.jpg"),
    "host not allowed": lambda b: b["tasks"][0]["data"].update(image="http://example.com/a.jpg"),
    "missing upload": lambda b: b["tasks"][0]["data"].update(image="/data/upload/1/missing.jpg"),
    "not an image": lambda b: b["tasks"][0]["data"].update(image="/data/upload/1/not-an-image.jpg"),
    "pixel bomb": lambda b: b["tasks"][0]["data"].update(image="/data/upload/1/bomb.png"),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_predict_bodies_get_a_clear_4xx_and_the_server_keeps_serving(client, bad_files, name, caplog):
    response = client.post("/predict", json=mutate(BAD_BODIES[name]))
    assert 400 <= response.status_code < 500, (name, response.status_code, response.get_data(as_text=True))
    assert isinstance(response.json["error"], str) and response.json["error"]
    assert any(str(response.status_code) in record.getMessage() for record in caplog.records)
    assert client.post("/predict", json=keypoints_body()).status_code == 200


BAD_CONTEXTS = [
    "context not an object",
    "point outside the image",
    "label not in brush control",
    "region not a smart prompt",
    "image rotation not a number",
    "text naming no label",
]


@pytest.mark.parametrize("name", BAD_CONTEXTS)
def test_a_bad_context_is_refused_before_the_image_is_downloaded_or_encoded(
    settings, redis_url, label_studio, name, caplog
):
    client, _ = make_client(replace(settings, redis_url=redis_url))
    caplog.set_level(logging.INFO, logger="backend.cache.embeddings")
    body = mutate(BAD_BODIES[name])
    image_path = body["tasks"][0]["data"]["image"]
    seen = len(label_studio.requests)
    response = client.post("/predict", json=body)
    assert 400 <= response.status_code < 500, response.json
    assert [path for _, path, _ in label_studio.requests[seen:] if path.startswith(image_path)] == []
    assert encodes_logged(caplog.records) == 0


@pytest.mark.parametrize(
    "path, data", [("/predict", b"{not json"), ("/predict", b"[1, 2]"), ("/webhook", b"nope"), ("/setup", b"")]
)
def test_malformed_json_is_a_400(client, path, data):
    response = client.post(path, data=data, content_type="application/json")
    assert response.status_code == 400 and "error" in response.json


def test_unknown_route_and_method_are_json_errors(client):
    assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").json
    assert client.get("/predict").status_code == 405 and "error" in client.get("/predict").json


def test_a_bad_task_in_a_batch_does_not_lose_the_good_ones(client):
    body = keypoints_body()
    good = body["tasks"][0]
    bad = dict(good, id=99, data={"image": "/data/upload/1/missing.jpg"})
    body["tasks"] = [good, bad, dict(good, id=3)]
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.json["results"]
    assert len(results) == 3 and results[0]["result"] and results[2]["result"]
    # An empty list, not an empty prediction: Label Studio then stores nothing and asks again next time.
    assert results[1] == []
    assert response.json["errors"][0]["task"] == 99 and "404" in response.json["errors"][0]["error"]


def test_oversized_body_is_a_413_naming_the_setting(client):
    response = client.post("/predict", data=b"{" + b" " * (21 * 1024 * 1024) + b"}", content_type="application/json")
    assert response.status_code == 413 and "MAX_REQUEST_BYTES (20971520 bytes)" in response.json["error"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook", "/preannotate"])
def test_a_json_body_without_its_content_type_is_told_to_send_the_header(client, path, content_type):
    """The body is valid JSON: only the header is missing, and the answer must say so rather than "not JSON"."""
    body = json.dumps(keypoints_body()).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(path, data=body, headers=headers)
    assert response.status_code == 400, response.json
    assert "Content-Type: application/json" in response.json["error"], response.json


def test_an_image_that_cannot_be_decoded_is_described_not_shown_as_a_python_object(client, bad_files):
    response = client.post("/predict", json=mutate(BAD_BODIES["not an image"]))
    error = response.json["error"]
    assert response.status_code == 422 and error.startswith("the image could not be decoded"), error
    assert "23 bytes" in error and "login page" in error and "BytesIO" not in error and " at 0x" not in error


@pytest.mark.parametrize(
    "region, key",
    [(0, "x"), (0, "y"), (1, "x"), (1, "width")],
    ids=["keypoint x", "keypoint y", "rectangle x", "rectangle width"],
)
def test_a_huge_coordinate_gets_a_short_reason(client, region, key):
    """Found on a first run: x=1e308 came back as a 373-character reason holding a 300-digit number."""
    body = recorded("05-predict-interactive-rectangle.json") if region else keypoints_body()
    body["params"]["context"]["result"][0]["value"][key] = 1e308
    response = client.post("/predict", json=body)
    error = response.json["error"]
    assert response.status_code == 422 and "outside the image" in error and "1e+308%" in error, error
    assert len(error) < 100 and not re.search(r"[0-9]{20}", error), error


@pytest.mark.parametrize(
    "body",
    [[1], {}, {"project": "abc"}, {"project": 0}, {"project": 3, "max_tasks": 0}, {"project": 3, "batch_size": "4"}],
)
def test_bad_project_run_requests_get_a_400(client, body):
    response = client.post("/preannotate", json=body)
    assert response.status_code == 400 and response.json["error"], response.json
    assert client.get("/preannotate").status_code == 400
    assert client.get("/preannotate", query_string={"project": "x"}).status_code == 400


def test_a_project_run_label_studio_refuses_answers_why(client):
    # The stand-in serves images, not projects: Label Studio's own 404 must reach the caller, and stay visible.
    response = client.post("/preannotate", json={"project": 4242})
    assert response.status_code == 422, response.json
    assert "project 4242" in response.json["error"] and "404" in response.json["error"]
    progress = client.get("/preannotate", query_string={"project": 4242})
    assert progress.status_code == 200 and progress.json["state"] == "failed"
    assert client.get("/preannotate", query_string={"project": 4243}).status_code == 404


def test_a_run_of_a_project_label_studio_does_not_have_leaves_no_folder_for_it(client, settings):
    assert client.post("/preannotate", json={"project": 4242}).status_code == 422
    assert client.post("/encode", query_string={"project": 4242}).status_code == 422
    assert not (Path(settings.model_dir) / "4242").exists()


@pytest.mark.parametrize("path", ["/preannotate", "/encode"])
def test_stopping_a_run_that_is_not_going_on_says_so(client, path):
    """Nothing runs: the answer is not 202 "stopping", and the next run is not stopped by the request."""
    unknown = client.delete(path, query_string={"project": 4243})
    assert unknown.status_code == 404 and "no " in unknown.json["error"] and "4243" in unknown.json["error"]
    client.post(path, json={"project": 4242}, query_string={"project": 4242})  # fails: Label Studio has no 4242
    ended = client.delete(path, query_string={"project": 4242})
    assert ended.status_code == 200 and ended.json["state"] == "failed", ended.json


def test_a_stop_asked_while_the_run_is_still_starting_stops_it(settings, redis_url):
    """Label Studio has not answered the run's first call when its start answers: the stop must still reach it."""
    label_studio = ProjectApiStandIn(hold_project=True)
    try:
        client, _ = make_client(replace(settings, redis_url=redis_url, label_studio_url=label_studio.url))
        project = {"project": ProjectApiStandIn.PROJECT}
        started = client.post("/preannotate", json=project)
        assert started.status_code == 202 and started.json["state"] == "starting", started.json
        assert client.delete("/preannotate", query_string=project).status_code == 202
        label_studio.release.set()
        progress = run_ended(lambda: client.get("/preannotate", query_string=project).json)
        assert progress["state"] == "stopped" and progress["message"] == "stopped on request", progress
    finally:
        label_studio.close()


def test_a_start_while_a_run_holds_the_project_names_the_run(client, redis_url):
    held = redis.Redis.from_url(redis_url).lock("sam:encode-lock:4242", timeout=60)
    assert held.acquire(blocking=False)
    try:
        response = client.post("/encode", query_string={"project": 4242})
    finally:
        held.release()
    assert response.status_code == 409 and response.json["error"] == "another encoding run of this project is going on"


def test_a_project_run_without_label_studio_credentials_is_a_422(settings, redis_url):
    test_client, _ = make_client(replace(settings, label_studio_url="", redis_url=redis_url))
    response = test_client.post("/preannotate", json={"project": 3})
    assert response.status_code == 422 and "LABEL_STUDIO_URL" in response.json["error"]


@pytest.mark.parametrize(
    "project",
    ["1" + "0" * 300 + ".1700000000", 10**300, -5, "１２.3", True, "12.1700000000"],
    ids=["300-digit string", "300-digit int", "negative", "full-width digits", "bool", "ordinary"],
)
def test_setup_with_an_out_of_range_project_id_answers_the_default_version(client, settings, project):
    """Found by the fuzzer: a 300-digit project id became a path too long for the file system (a 500)."""
    Path(settings.model_dir).mkdir(parents=True, exist_ok=True)  # so the lookup reaches the id's folder
    body = dict(recorded("02-setup.json"), project=project)
    response = client.post("/setup", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["model_version"]
