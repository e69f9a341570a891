"""The prediction asked for when an annotator opens a task without one answers within TASK_OPEN_WAIT: what was
computed earlier at once, else nothing now while the pre-annotation goes on in the background, which also encodes
the image so the first click is warm, and whose answer reaches the annotator: imported into Label Studio (the
stand-in) as the task's prediction, or kept for the task's next open."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

from backend.errors import ImageError
from backend.runs.task_open import TaskOpenPredictions
from tests.assets import encodes_logged, recorded
from tests.test_grounding_dino import grounded_client


def detect_passes(records: list) -> int:
    return sum(record.getMessage().startswith("detected ") for record in records)


def test_a_task_opened_before_its_pre_annotation_is_done_opens_empty_and_the_next_open_gets_it_at_once(
    grounded_settings, caplog
):
    client, _ = grounded_client(replace(grounded_settings, task_open_wait_s=0))
    caplog.set_level(logging.INFO)
    task_open = recorded("03a-predict-on-task-open.json")
    task_open["tasks"][0]["id"] = 987654321  # a task Label Studio's API does not know: the answer is kept here
    first = client.post("/predict", json=task_open)
    assert first.status_code == 200
    assert first.json == {"results": [[]]}  # stored by Label Studio as no prediction: the next open asks again
    task_opens = client.application.extensions["backend"].task_opens
    assert task_opens.wait_idle(300)
    # The next open waits no longer (TASK_OPEN_WAIT 0, as on a machine too loaded to decode in time): the answer the
    # first open's pass finished is kept for it, not recomputed.
    second = client.post("/predict", json=task_open)
    assert second.status_code == 200
    assert second.json["results"][0]["result"]
    assert second.headers["X-Embedding-Cache"] == "miss"  # computed by the first open's pass
    assert detect_passes(caplog.records) == 1 and encodes_logged(caplog.records) == 1
    click = recorded("04-predict-interactive-keypoints.json")
    click["tasks"][0]["data"]["image"] = task_open["tasks"][0]["data"]["image"]
    assert client.post("/predict", json=click).headers["X-Embedding-Cache"] == "hit"


def test_a_pre_annotation_finished_after_its_task_opened_is_imported_into_label_studio(
    grounded_settings, label_studio, caplog
):
    client, predictor = grounded_client(replace(grounded_settings, task_open_wait_s=0))
    project = label_studio.add_project(
        recorded("03a-predict-on-task-open.json")["label_config"], ["/data/local-files/?d=e2e/car_320x240_local.jpg"]
    )
    (task,) = label_studio.projects[project]["tasks"]
    task_open = recorded("03a-predict-on-task-open.json")
    task_open["project"] = f"{project}.1795623701"
    task_open["tasks"] = [{"id": task["id"], "data": task["data"]}]

    assert client.post("/predict", json=task_open).json == {"results": [[]]}
    assert client.application.extensions["backend"].task_opens.wait_idle(300)

    (imported,) = label_studio.imported[project]  # what the task shows when it is opened again
    assert imported["task"] == task["id"] and imported["result"]
    assert imported["model_version"] == predictor.decoders.current_name(project)


class InstantPredictor:
    """An inference whose pre-annotation ends at once, as one does for an image that cannot be fetched."""

    def predict_batch(self, image_urls: list, config: object, project_id: object) -> list:
        return [ImageError(f"cannot fetch {image_urls[0]}")]


def test_task_opens_whose_passes_end_at_once_never_hang():
    # A pass that ends before its clean-up is registered runs that clean-up at once, on the request's thread.
    task_opens = TaskOpenPredictions(InstantPredictor(), wait_s=30)  # type: ignore[arg-type]
    outcomes: list = []

    def open_tasks() -> None:
        outcomes.extend(task_opens.predict(f"/data/upload/{index}.jpg", None, 1) for index in range(300))  # type: ignore[arg-type]

    opener = threading.Thread(target=open_tasks, daemon=True)
    opener.start()
    opener.join(timeout=60)
    assert not opener.is_alive(), f"task opens hung after {len(outcomes)} of 300"
    assert all(isinstance(outcome, ImageError) for outcome in outcomes) and len(outcomes) == 300
    assert task_opens.wait_idle(5)
