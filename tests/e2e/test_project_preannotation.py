"""Whole-project pre-annotation against the real Label Studio: `python -m backend preannotate` stopped by a
task limit and by Ctrl-C, then resumed, leaves exactly one prediction of the model version per task and a
recorded error for the task whose image cannot be fetched; POST /preannotate does the same in the background."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
MODEL_VERSION = "sam-vit_b"
IMAGES = 7  # enough that a Ctrl-C after the first new prediction lands mid-run (4 left after the trial)
UNREACHABLE = "/data/upload/999/missing.jpg"


def make_project(api: LabelStudioApi, title: str) -> tuple[int, dict[int, str]]:
    """A project of IMAGES uploaded images of several sizes, then one task whose image does not exist."""
    project = api.call("POST", "/api/projects", json={"title": title, "label_config": LABEL_CONFIG})["id"]
    files = {
        f"image{index}.jpg": (
            f"image{index}.jpg",
            encode(smooth_object_image(160 + 16 * index, 120 + 8 * index, index)),
            "image/jpeg",
        )
        for index in range(IMAGES)
    }
    api.call("POST", f"/api/projects/{project}/import", files=files)
    api.call("POST", f"/api/projects/{project}/import", json=[{"image": UNREACHABLE}])
    listed = api.call("GET", "/api/tasks", params={"project": project, "page_size": 100})["tasks"]
    return project, {task["id"]: task["data"]["image"] for task in listed}


def predictions_by_task(api: LabelStudioApi, project: int) -> dict[int, list[dict]]:
    by_task: dict[int, list[dict]] = {}
    for prediction in api.call("GET", "/api/predictions", params={"project": project}):
        by_task.setdefault(prediction["task"], []).append(prediction)
    return by_task


def assert_one_prediction_per_reachable_task(api: LabelStudioApi, project: int, tasks: dict[int, str]) -> None:
    by_task = predictions_by_task(api, project)
    for task, image in tasks.items():
        if image == UNREACHABLE:
            assert task not in by_task, by_task[task]
            continue
        assert len(by_task.get(task, [])) == 1, f"task {task}: {len(by_task.get(task, []))} predictions"
        (prediction,) = by_task[task]
        assert prediction["model_version"] == MODEL_VERSION
        assert any(region["type"] == "brushlabels" for region in prediction["result"]), prediction["result"]


@pytest.fixture(scope="module")
def environment(
    label_studio, personal_access_token, sam_checkpoint, grounding_dino_files, redis_server, tmp_path_factory
):
    model_dir = tmp_path_factory.mktemp("preannotate-models")
    return backend_environment(
        label_studio.url, personal_access_token, sam_checkpoint, grounding_dino_files, redis_server.url, model_dir
    )


def preannotate(environment: dict[str, str], project: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "backend", "preannotate", "--project", str(project), "--batch-size", "2", *extra],
        cwd=REPO,
        env={**os.environ, **environment},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def summary(process: subprocess.Popen, timeout_s: float = 600) -> tuple[int, dict, str]:
    stdout, stderr = process.communicate(timeout=timeout_s)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no summary printed; rc {process.returncode}; stderr:\n{stderr[-3000:]}"
    return process.returncode, json.loads(lines[-1]), stderr


def test_the_command_stops_and_resumes_without_duplicates(label_studio, personal_access_token, environment):
    api = LabelStudioApi(label_studio.url, personal_access_token)
    project, tasks = make_project(api, "preannotate command")

    # 1. A trial on three tasks: exactly three predictions, nothing else touched.
    code, first, stderr = summary(preannotate(environment, project, "--max-tasks", "3"))
    assert code == 0 and first["state"] == "stopped" and first["predicted"] == 3, (first, stderr[-2000:])
    assert sum(len(found) for found in predictions_by_task(api, project).values()) == 3
    assert "task/s" in stderr or "s/task" in stderr, stderr[-2000:]  # the progress bar shows its rate

    # 2. Ctrl-C once a new prediction is stored: the batches in flight are stored, then it exits 130.
    process = preannotate(environment, project, "--batch-size", "1")
    give_up_at = time.monotonic() + 300
    while time.monotonic() < give_up_at and process.poll() is None:
        if sum(len(found) for found in predictions_by_task(api, project).values()) > 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    code, second, stderr = summary(process)
    assert code == 130 and second["state"] == "stopped", (second, stderr[-2000:])
    assert second["skipped"] == 3 and 1 <= second["predicted"] < IMAGES - 3, second
    stored = predictions_by_task(api, project)
    assert all(len(found) == 1 for found in stored.values()), stored
    assert sum(len(found) for found in stored.values()) == 3 + second["predicted"]

    # 3. Resumed: the rest, each task once; the unreachable image is a recorded error, not a prediction.
    code, third, stderr = summary(preannotate(environment, project))
    assert code == 0 and third["state"] == "finished", (third, stderr[-2000:])
    assert third["skipped"] == 3 + second["predicted"] and third["failed"] == 1, third
    assert third["predicted"] == IMAGES - third["skipped"], third
    assert_one_prediction_per_reachable_task(api, project, tasks)
    errors_file = os.path.join(environment["MODEL_DIR"], str(project), "preannotate-errors.jsonl")
    with open(errors_file) as handle:
        errors = [json.loads(line) for line in handle]
    unreachable_task = next(task for task, image in tasks.items() if image == UNREACHABLE)
    assert {entry["task"] for entry in errors} == {unreachable_task}, errors
    assert all(entry["status"] >= 400 and entry["error"] for entry in errors), errors

    # 4. Nothing left: a fourth run predicts nothing new.
    code, fourth, _ = summary(preannotate(environment, project))
    assert code == 0 and fourth["predicted"] == 0 and fourth["skipped"] == IMAGES and fourth["failed"] == 1, fourth
    assert_one_prediction_per_reachable_task(api, project, tasks)


def test_background_run_through_the_backend(label_studio, personal_access_token, environment, tmp_path):
    api = LabelStudioApi(label_studio.url, personal_access_token)
    project, tasks = make_project(api, "preannotate background")
    backend = GunicornServer(environment, tmp_path / "gunicorn.log", workers=2).start()
    try:
        http = requests.Session()

        def progress() -> dict:
            answer = http.get(f"{backend.url}/preannotate", params={"project": project}, timeout=30)
            assert answer.status_code == 200, answer.text
            return answer.json()

        def run_to_the_end(**options: object) -> dict:
            started = http.post(f"{backend.url}/preannotate", json={"project": project, **options}, timeout=60)
            assert started.status_code == 202, started.text
            give_up_at = time.monotonic() + 600
            while (state := progress())["state"] in GOING_ON and time.monotonic() < give_up_at:
                time.sleep(0.5)
            return state

        partial = run_to_the_end(max_tasks=4)
        assert partial["state"] == "stopped" and partial["predicted"] == 4, partial
        done = run_to_the_end()
        assert done["state"] == "finished" and done["skipped"] == 4 and done["failed"] == 1, done
        assert done["predicted"] == IMAGES - 4 and done["rate_per_s"] > 0, done
        assert_one_prediction_per_reachable_task(api, project, tasks)
    finally:
        backend.stop()
