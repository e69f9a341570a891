"""A "Retrieve predictions" batch that cannot finish within PREDICT_DEADLINE hands the tasks it did not answer to
the project's background pre-annotation run, which imports their predictions into Label Studio (the stand-in, a
real HTTP server) with the model_version the batch answered with: one run per project, resumed after a restart,
skipping tasks that got a prediction meanwhile.

Small real models (the suite's SAM and GroundingDINO with random weights) on distinct 320x240 images."""

from __future__ import annotations

import time
from dataclasses import replace

from backend.http.server import create_app
from backend.project_files import ProjectFiles
from backend.protocol.label_config import parse_label_config
from backend.runs.handed_over import HandedOverTasks
from tests.assets import recorded
from tests.conftest import make_client
from tests.test_batch_deadline import task_urls

CONFIG = recorded("03-predict-batch.json")["label_config"]


def loaded_predictor(settings, media_root):
    """A predictor whose models are loaded and warm, and the seconds one image's pre-annotation takes."""
    _, predictor = make_client(settings)
    predictor.detector.get(120)
    config = parse_label_config(CONFIG)
    predictor.predict_batch(task_urls(media_root, 2000, 1), config)  # the first pass pays for lazy set-ups
    started = time.monotonic()
    predictor.predict_batch(task_urls(media_root, 2001, 1), config)
    return predictor, time.monotonic() - started


def project_with(label_studio, media_root, first_seed: int, count: int) -> tuple[int, list[int]]:
    project = label_studio.add_project(CONFIG, task_urls(media_root, first_seed, count))
    return project, [task["id"] for task in label_studio.projects[project]["tasks"]]


def retrieve(project: int, label_studio, task_ids: list[int]) -> dict:
    """The Data Manager's "Retrieve predictions" for these tasks, as Label Studio 1.23 sends it."""
    body = recorded("03-predict-batch.json")
    body["project"] = f"{project}.1795623701"
    body["tasks"] = [{"id": task_id, "data": label_studio.task(task_id)["data"]} for task_id in task_ids]
    return body


def waiting_tasks(label_studio, task_ids: list[int]) -> dict[int, dict]:
    """The tasks as a batch hands them over: their data by id."""
    return {task_id: label_studio.task(task_id)["data"] for task_id in task_ids}


def settled(settings, project: int, runs, timeout_s: float = 300) -> dict:
    """The project's run progress once no task waits as handed over and its run has ended."""
    waiting = HandedOverTasks(ProjectFiles(settings.model_dir, project).handed_over)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        progress = runs.progress(project) or {}
        if not waiting.ids() and progress.get("state") in ("finished", "failed", "stopped"):
            return progress
        time.sleep(0.1)
    raise AssertionError(f"the run did not settle: {runs.progress(project)}, waiting {waiting.ids()}")


def imported_tasks(label_studio, project: int) -> list[int]:
    return sorted(prediction["task"] for prediction in label_studio.imported[project])


def test_the_tasks_a_batch_leaves_unfinished_are_predicted_in_the_background_and_imported(
    grounded_settings, media_root, label_studio
):
    # A process whose steps were never measured finishes the batch's first image whatever it takes; a deadline of
    # 50 ms then leaves the other nine to the background run, on any machine.
    _, predictor = make_client(grounded_settings)
    predictor.detector.get(120), predictor.models.get(120)
    project, task_ids = project_with(label_studio, media_root, 2100, 10)
    settings = replace(grounded_settings, predict_deadline_s=0.05)
    client = create_app(settings, predictor).test_client()

    response = client.post("/predict", json=retrieve(project, label_studio, task_ids))

    assert response.status_code == 200, response.json
    results = response.json["results"]
    answered = [task_id for task_id, entry in zip(task_ids, results, strict=True) if entry != []]
    unfinished = [task_id for task_id, entry in zip(task_ids, results, strict=True) if entry == []]
    assert answered == task_ids[:1] and unfinished == task_ids[1:], results
    assert response.json["background"] == {
        "project": project,
        "tasks": unfinished,
        "progress": f"/preannotate?project={project}",
    }
    progress = settled(settings, project, client.application.extensions["backend"].runs)
    assert progress["state"] == "finished" and progress["predicted"] == len(unfinished), progress
    # Each unfinished task imported once, none of those answered, with the batch's model_version and regions.
    assert imported_tasks(label_studio, project) == unfinished
    versions = {entry["model_version"] for entry in results if entry != []}
    assert {prediction["model_version"] for prediction in label_studio.imported[project]} == versions
    assert all(prediction["result"] for prediction in label_studio.imported[project])
    assert client.get("/preannotate", query_string={"project": project}).json["state"] == "finished"
    assert client.get("/status").json["preannotation"][str(project)]["predicted"] == len(unfinished)


def test_a_hand_over_while_the_project_runs_joins_that_run(grounded_settings, media_root, label_studio):
    predictor, _ = loaded_predictor(grounded_settings, media_root)
    project, task_ids = project_with(label_studio, media_root, 2200, 3)
    client = create_app(grounded_settings, predictor).test_client()
    runs = client.application.extensions["backend"].runs
    label_studio.stalls[f"/api/predictions/?task={task_ids[0]}"] = 2.0  # the first run is busy with its first task
    try:
        first = runs.hand_over(project, waiting_tasks(label_studio, task_ids[:1]))
        second = runs.hand_over(project, waiting_tasks(label_studio, task_ids[1:]))
        settled(grounded_settings, project, runs)
    finally:
        label_studio.stalls.clear()

    assert first["state"] == "starting" and second["state"] == "busy"
    assert imported_tasks(label_studio, project) == task_ids  # each once


def test_a_run_stopped_in_the_middle_resumes_when_the_backend_starts_again(grounded_settings, media_root, label_studio):
    predictor, _ = loaded_predictor(grounded_settings, media_root)
    settings = replace(grounded_settings, grounding_dino_batch=1)  # one task per batch, imported one by one
    project, task_ids = project_with(label_studio, media_root, 2300, 4)
    HandedOverTasks(ProjectFiles(settings.model_dir, project).handed_over).add(waiting_tasks(label_studio, task_ids))
    label_studio.stalls[f"/api/predictions/?task={task_ids[1]}"] = 2.0  # time to stop the run after its first task
    try:
        client = create_app(settings, predictor).test_client()  # a start finds the tasks waiting: it resumes them
        runs = client.application.extensions["backend"].runs
        deadline = time.monotonic() + 300
        while not label_studio.imported[project] and time.monotonic() < deadline:
            time.sleep(0.05)
        client.delete("/preannotate", query_string={"project": project})
        deadline = time.monotonic() + 300
        while (runs.progress(project) or {}).get("state") != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        label_studio.stalls.clear()
    stopped_with = imported_tasks(label_studio, project)
    left = HandedOverTasks(ProjectFiles(settings.model_dir, project).handed_over).ids()

    restarted = create_app(settings, predictor).test_client()
    progress = settled(settings, project, restarted.application.extensions["backend"].runs)

    assert stopped_with and left and sorted(stopped_with + left) == task_ids, (stopped_with, left)
    assert progress["state"] == "finished" and progress["predicted"] == len(left)
    assert imported_tasks(label_studio, project) == task_ids  # each once over both runs


def test_tasks_predicted_after_they_were_handed_over_are_skipped(grounded_settings, media_root, label_studio):
    predictor, _ = loaded_predictor(grounded_settings, media_root)
    project, task_ids = project_with(label_studio, media_root, 2400, 3)
    HandedOverTasks(ProjectFiles(grounded_settings.model_dir, project).handed_over).add(
        waiting_tasks(label_studio, task_ids)
    )
    # Meanwhile a second "Retrieve predictions" answered one of them, and Label Studio stored that answer.
    version = predictor.decoders.current_name(project)
    label_studio.task(task_ids[1])["predictions"].append({"model_version": version, "result": [], "task": task_ids[1]})

    client = create_app(grounded_settings, predictor).test_client()
    progress = settled(grounded_settings, project, client.application.extensions["backend"].runs)

    assert imported_tasks(label_studio, project) == [task_ids[0], task_ids[2]]
    assert progress["skipped"] == 1 and progress["predicted"] == 2


def test_a_batch_that_finishes_no_task_answers_503_saying_why_and_goes_on_in_the_background(
    grounded_settings, media_root, label_studio
):
    predictor, _ = loaded_predictor(grounded_settings, media_root)
    project, task_ids = project_with(label_studio, media_root, 2500, 2)
    settings = replace(grounded_settings, predict_deadline_s=0.001)
    client = create_app(settings, predictor).test_client()

    response = client.post("/predict", json=retrieve(project, label_studio, task_ids))

    assert response.status_code == 503
    message = response.json["error"]
    assert "not one of the 2 tasks" in message and "PREDICT_DEADLINE" in message and "ML_TIMEOUT_PREDICT" in message
    assert f"GET /preannotate?project={project}" in message
    settled(settings, project, client.application.extensions["backend"].runs)
    assert imported_tasks(label_studio, project) == task_ids


def test_without_label_studio_api_the_unfinished_tasks_are_answered_empty_as_the_log_says_once(
    grounded_settings, media_root, label_studio, caplog
):
    task_urls(media_root, 2600, 3)
    public = media_root / "public"
    urls = []
    for seed in range(2600, 2603):  # served without credentials, from an allowed host
        (public / f"stream-{seed}.jpg").write_bytes((media_root / "upload" / "1" / f"stream-{seed}.jpg").read_bytes())
        urls.append(label_studio.url.replace("127.0.0.1", "localhost") + f"/stream-{seed}.jpg")
    settings = replace(grounded_settings, label_studio_url="", label_studio_api_key="", predict_deadline_s=0.001)
    client, _ = make_client(settings)
    body = recorded("03-predict-batch.json")
    body["tasks"] = [{"id": 900 + index, "data": {"image": url}} for index, url in enumerate(urls)]

    answers = [client.post("/predict", json=body) for _ in range(2)]

    assert all("background" not in answer.json for answer in answers)
    assert all(len(answer.json["errors"]) >= 2 for answer in answers)  # 200 with one answer, or 503 with none
    said = [record.getMessage() for record in caplog.records if "set LABEL_STUDIO_URL" in record.getMessage()]
    assert len(said) == 1 and "answered []" in said[0], said
    assert not ProjectFiles(settings.model_dir, 1).handed_over.exists()
