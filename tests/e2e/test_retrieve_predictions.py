"""One "Retrieve predictions" on a project too big for PREDICT_DEADLINE, against the real Label Studio: the click
stores the tasks the batch finished, the backend finishes the rest in the background and imports each prediction
as it is made, so every task holds exactly one prediction of the model version without a second click, within
FILL_TIMEOUT_S; the run's progress is visible meanwhile and Label Studio logs no error."""

from __future__ import annotations

import re
import time

import pytest
import requests

from backend.runs.preannotate import GOING_ON
from tests.assets import REPO, encode, smooth_object_image
from tests.e2e.conftest import backend_environment
from tests.e2e.label_studio import LabelStudioApi
from tests.load_harness import GunicornServer

pytestmark = pytest.mark.e2e

LABEL_CONFIG = (REPO / "label_config.xml").read_text()
TASKS = 24
PREDICT_DEADLINE_S = 5  # a few of the 24 small images on a CPU, never all of them
HANDED_OVER = re.compile(r"project [0-9]+: ([0-9]+) tasks not finished within PREDICT_DEADLINE go on in the background")
FILL_TIMEOUT_S = 1200  # every task holds its prediction by then (the time each run took is printed)


def test_one_retrieve_predictions_fills_a_project_bigger_than_the_deadline(
    label_studio, personal_access_token, sam_checkpoint, grounding_dino_files, redis_server, tmp_path
):
    api = LabelStudioApi(label_studio.url, personal_access_token)
    project = api.call("POST", "/api/projects", json={"title": "retrieve once", "label_config": LABEL_CONFIG})["id"]
    files = {
        f"image{index}.jpg": (f"image{index}.jpg", encode(smooth_object_image(160, 120, 300 + index)), "image/jpeg")
        for index in range(TASKS)
    }
    api.call("POST", f"/api/projects/{project}/import", files=files)
    tasks = [
        task["id"] for task in api.call("GET", "/api/tasks", params={"project": project, "page_size": 100})["tasks"]
    ]
    assert len(tasks) == TASKS
    environment = backend_environment(
        label_studio.url, personal_access_token, sam_checkpoint, grounding_dino_files, redis_server.url, tmp_path
    ) | {"PREDICT_DEADLINE": str(PREDICT_DEADLINE_S), "MAX_OBJECTS": "3"}  # random masks: 20 cost ~1 MB a task
    backend = GunicornServer(environment, tmp_path / "gunicorn.log", workers=2).start()
    log_start = label_studio.log_path.stat().st_size
    try:
        # The models loaded, as on a backend that has been up a while: the deadline is for predicting, not loading.
        give_up_at = time.monotonic() + 300
        while time.monotonic() < give_up_at:
            health = requests.get(f"{backend.url}/health", timeout=30).json()
            if health["models"] == "ready" and health["detector"] == "ready":
                break
            time.sleep(1)
        connected = api.call("POST", "/api/ml", json={"url": backend.url, "project": project, "title": "SAM"})
        assert connected["state"] == "CO", connected
        started = time.monotonic()
        api.call(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": {"all": True, "excluded": []}},
        )
        clicked_s = time.monotonic() - started
        seen_running: list[dict] = []
        while time.monotonic() - started < FILL_TIMEOUT_S:
            progress = requests.get(f"{backend.url}/preannotate", params={"project": project}, timeout=30)
            if progress.status_code == 200 and progress.json()["state"] in GOING_ON:
                seen_running.append(progress.json())
            if len(predicted_tasks(label_studio, personal_access_token, project)) == TASKS:
                break
            time.sleep(0.5)
        filled_s = time.monotonic() - started
        status = requests.get(f"{backend.url}/status", timeout=30).json()
    finally:
        backend.stop()
    handed = [int(count) for count in HANDED_OVER.findall(backend.log_path.read_text(errors="replace"))]
    print(f"\nretrieve once: the action answered in {clicked_s:.1f} s; {handed} of {TASKS} tasks were handed over;")
    print(f"all {TASKS} held a prediction {filled_s:.1f} s after the click")

    by_task = predicted_tasks(label_studio, personal_access_token, project)
    assert len(handed) == 1 and 0 < handed[0] < TASKS, handed  # the batch answered some, handed the others over
    assert sorted(by_task) == sorted(tasks), f"after {filled_s:.0f} s: {len(by_task)} of {TASKS} tasks predicted"
    assert all(len(found) == 1 for found in by_task.values()), by_task  # no duplicates
    assert {prediction["model_version"] for found in by_task.values() for prediction in found} == {"sam-vit_b"}
    assert seen_running and seen_running[-1]["predicted"] <= handed[0], seen_running
    final = status["preannotation"][str(project)]
    assert final["state"] == "finished" and final["predicted"] + final["skipped"] == handed[0], final
    with open(label_studio.log_path, "rb") as handle:
        handle.seek(log_start)
        logged = handle.read().decode(errors="replace")
    assert not [line for line in logged.splitlines() if " ERROR " in line or "Traceback" in line], logged[-3000:]


def predicted_tasks(label_studio, token: str, project: int) -> dict[int, list[dict]]:
    api = LabelStudioApi(label_studio.url, token)  # fresh credentials each time: the run outlasts an access token
    by_task: dict[int, list[dict]] = {}
    for prediction in api.call("GET", "/api/predictions", params={"project": project}):
        by_task.setdefault(prediction["task"], []).append(prediction)
    return by_task
