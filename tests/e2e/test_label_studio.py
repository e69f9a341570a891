"""End to end with the real Label Studio (pinned, from PyPI) and this backend under real gunicorn.

Once with the legacy token and once with a personal access token (legacy tokens then switched off
for the organization, and the backend behind basic auth) as LABEL_STUDIO_API_KEY, it checks:
(1) "Retrieve predictions" stores brush predictions that decode to each image's size with the
    project's labels, and stores nothing for a task whose image cannot be fetched (so it is asked again);
(2) Label Studio's own /api/ml/{id}/interactive-annotating returns a brush result;
(3) a submitted annotation reaches /webhook.
`make e2e` runs it (`make test` runs it as its own stage); it is deselected from the unit run.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.assets import REPO, decode_brush, encode, smooth_object_image
from tests.e2e.conftest import backend_environment
from tests.e2e.label_studio import LabelStudioApi, LabelStudioProcess
from tests.load_harness import GunicornServer

pytestmark = pytest.mark.e2e

LABEL_CONFIG = (REPO / "label_config.xml").read_text()
LABELS = {"Car", "Wheel"}
# Image file -> (height, width) as Label Studio shows it (the PNG is stored 400x300 with EXIF Orientation=6).
UPLOADS = {
    "car_1024x768.jpg": (lambda: encode(smooth_object_image(1024, 768, 1)), (768, 1024)),
    "car_400x300_exif6.png": (lambda: encode(smooth_object_image(400, 300, 3), "PNG", 6), (400, 300)),
}
LOCAL_FILE = ("e2e/car_320x240_local.jpg", (240, 320))
UNREACHABLE = "/data/upload/999/missing.jpg"
WEBHOOK_HIT = re.compile(r'"POST /webhook HTTP/1\.[01]" 200 ')


@dataclass
class Run:
    """One project connected to one backend, as a Label Studio user would set it up."""

    api: LabelStudioApi
    backend: GunicornServer
    project: int
    ml_backend: int
    tasks: dict[int, str]  # task id -> its image URL


def import_tasks(api: LabelStudioApi, label_studio: LabelStudioProcess, project: int) -> dict[int, str]:
    files = {name: (name, make(), "application/octet-stream") for name, (make, _) in UPLOADS.items()}
    api.call("POST", f"/api/projects/{project}/import", files=files)
    api.call("POST", f"/api/projects/{project}/import", json=[{"image": UNREACHABLE}])
    local_dir = label_studio.files_root / f"project-{project}" / Path(LOCAL_FILE[0]).parent
    local_dir.mkdir(parents=True, exist_ok=True)
    (local_dir / Path(LOCAL_FILE[0]).name).write_bytes(encode(smooth_object_image(320, 240, 5)))
    storage = api.call(
        "POST",
        "/api/storages/localfiles",
        json={"project": project, "path": str(local_dir), "use_blob_urls": True, "regex_filter": r".*\.jpg"},
    )
    api.call("POST", f"/api/storages/localfiles/{storage['id']}/sync")
    listed = api.call("GET", "/api/tasks", params={"project": project, "page_size": 100})["tasks"]
    tasks = {task["id"]: task["data"]["image"] for task in listed}
    assert len(tasks) == len(UPLOADS) + 2, tasks
    return tasks


def shown_size(image_url: str) -> tuple[int, int] | None:
    for name, (_, size) in UPLOADS.items():
        if image_url.startswith("/data/upload/") and image_url.endswith("-" + name):
            return size
    if image_url.startswith("/data/local-files/") and image_url.endswith(Path(LOCAL_FILE[0]).name):
        return LOCAL_FILE[1]
    return None


def authorize_webhook(api: LabelStudioApi, project: int, backend_url: str, basic_auth: tuple[str, str]) -> None:
    """Label Studio sends the ML backend's basic auth on ML calls but not on the webhook it creates
    for it: the README tells users to add the header to that webhook, as done here."""
    (webhook,) = [
        hook
        for hook in api.call("GET", "/api/webhooks/", params={"project": project})
        if hook["url"] == backend_url + "/webhook"
    ]
    credentials = base64.b64encode(":".join(basic_auth).encode()).decode()
    api.call("PATCH", f"/api/webhooks/{webhook['id']}/", json={"headers": {"Authorization": f"Basic {credentials}"}})


@pytest.fixture(scope="session", params=["legacy-token", "personal-access-token"])
def run(
    request, label_studio, personal_access_token, sam_checkpoint, grounding_dino_files, redis_server, tmp_path_factory
):
    kind = request.param
    admin = LabelStudioApi(label_studio.url, personal_access_token)
    # Label Studio 1.23 creates organizations with legacy tokens off; the PAT run proves that default works.
    admin.call(
        "POST",
        "/api/jwt/settings",
        json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": kind == "legacy-token"},
    )
    api_key = label_studio.legacy_token if kind == "legacy-token" else personal_access_token
    api = LabelStudioApi(label_studio.url, api_key)
    project = api.call("POST", "/api/projects", json={"title": f"e2e {kind}", "label_config": LABEL_CONFIG})["id"]
    tasks = import_tasks(api, label_studio, project)
    basic_auth = ("ls", "e2e-basic-pass") if kind != "legacy-token" else None
    model_dir = tmp_path_factory.mktemp("e2e-models")
    environment = backend_environment(
        label_studio.url, api_key, sam_checkpoint, grounding_dino_files, redis_server.url, model_dir
    )
    with_auth = {}
    if basic_auth:
        environment |= {"BASIC_AUTH_USER": basic_auth[0], "BASIC_AUTH_PASS": basic_auth[1]}
        with_auth = {"auth_method": "BASIC_AUTH", "basic_auth_user": basic_auth[0], "basic_auth_pass": basic_auth[1]}
    log_path = tmp_path_factory.mktemp("e2e-backend") / "gunicorn.log"
    backend = GunicornServer(environment, log_path, workers=2, auth=basic_auth)
    try:
        backend.start()
        connected = api.call(
            "POST",
            "/api/ml",
            json={"url": backend.url, "project": project, "title": "SAM", "is_interactive": True, **with_auth},
        )
        assert connected["state"] == "CO", connected
        if basic_auth:
            authorize_webhook(api, project, backend.url, basic_auth)
        yield Run(api, backend, project, connected["id"], tasks)
    finally:
        backend.stop()


def test_retrieve_predictions_stores_brush_masks_of_each_image_size(run):
    answer = run.api.call(
        "POST",
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": run.project},
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert answer["processed_items"] == len(run.tasks), answer
    predictions = run.api.call("GET", "/api/predictions", params={"project": run.project})
    by_task: dict[int, list[dict]] = {}
    for prediction in predictions:
        by_task.setdefault(prediction["task"], []).append(prediction)
    for task, image_url in run.tasks.items():
        size = shown_size(image_url)
        if size is None:  # the unreachable image: nothing stored, so the next run asks again
            assert image_url == UNREACHABLE and task not in by_task, by_task.get(task)
            continue
        (prediction,) = by_task.get(task, [None])
        assert prediction is not None, f"no prediction stored for task {task} ({image_url})"
        brushes = [region for region in prediction["result"] if region["type"] == "brushlabels"]
        assert brushes, f"task {task} ({image_url}): no brush region in {prediction['result']}"
        for region in brushes:
            assert set(region["value"]["brushlabels"]) <= LABELS and region["value"]["brushlabels"]
            assert (region["original_height"], region["original_width"]) == size
            assert decode_brush(region).shape == size


def test_interactive_annotating_through_label_studio_returns_a_brush(run):
    task = next(task for task, url in run.tasks.items() if url.endswith("-car_1024x768.jpg"))
    click = {
        "id": "e2e-click",
        "from_name": "tag2",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "original_width": 1024,
        "original_height": 768,
        "image_rotation": 0,
        "is_positive": True,
        "value": {"x": 50.0, "y": 55.0, "width": 0.6, "keypointlabels": ["Car"], "labels": ["Car"]},
    }
    answer = run.api.call(
        "POST", f"/api/ml/{run.ml_backend}/interactive-annotating", json={"task": task, "context": {"result": [click]}}
    )
    assert "errors" not in answer, answer
    (region,) = answer["data"]["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == ["Car"]
    assert decode_brush(region).shape == (768, 1024)


def test_submitted_annotation_reaches_the_webhook(run):
    before = len(WEBHOOK_HIT.findall(run.backend.log_path.read_text(errors="replace")))
    task = next(iter(run.tasks))
    box = {"x": 10.0, "y": 10.0, "width": 30.0, "height": 30.0, "rotation": 0, "rectanglelabels": ["Car"]}
    region = {"id": "e2e-box", "from_name": "tag3", "to_name": "image", "type": "rectanglelabels", "value": box}
    run.api.call("POST", f"/api/tasks/{task}/annotations", json={"result": [region]})
    # Label Studio without its own Redis sends webhooks within the API call; the log may lag a moment.
    give_up_at = time.monotonic() + 30
    while time.monotonic() < give_up_at:
        log = run.backend.log_path.read_text(errors="replace")
        if len(WEBHOOK_HIT.findall(log)) > before and "webhook ANNOTATION_CREATED" in log:
            break
        time.sleep(0.5)
    assert len(WEBHOOK_HIT.findall(log)) > before, "no POST /webhook answered 200 after the annotation"
    assert "webhook ANNOTATION_CREATED" in log
