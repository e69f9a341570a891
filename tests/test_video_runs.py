"""Long video tracks in the background (backend.runs.video): `POST|GET|DELETE /track?project=`, a stop in the middle
of a video, and "Retrieve predictions" handing a track that PREDICT_DEADLINE cuts short over to the project's
tracking run, which imports it into Label Studio (the stand-in, a real HTTP server).

The reduced SAM 2.1 video predictor with random weights, on the recorded video task of
tests/fixtures/ls-protocol/20-video-*.json and its recorded annotation (keyframes on frames 1 and 20, the object
gone after frame 40)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace

from backend.project_files import ProjectFiles
from backend.protocol.project_api import ProjectApi
from backend.protocol.video import video_objects
from backend.runs.video import VideoTrackRun
from tests.assets import REPO, recorded
from tests.conftest import RECORDED_VIDEO_FRAMES as FRAMES
from tests.test_video_http import batch_with_saved_annotation, sure_of_presence

# The recorded config without its <Labels>: a task with nothing drawn has nothing to track, rather than being
# pre-annotated from the labels (tests/test_video_zero_click.py runs that).
CONFIG = re.sub(r"<Labels.*?</Labels>", "", recorded("20-video-predict-batch.json")["label_config"], flags=re.DOTALL)
REGIONS = recorded("20-video-webhook-annotation-created.json")["annotation"]["result"]


def video_project(label_studio, annotated: list[bool]) -> tuple[int, list[int]]:
    """A stand-in project of the recorded video, one task per entry, those marked with the recorded annotation."""
    video_url = recorded("20-video-predict-batch.json")["tasks"][0]["data"]["video"]
    project = label_studio.add_project(CONFIG, [video_url] * len(annotated), field="video")
    task_ids = [task["id"] for task in label_studio.projects[project]["tasks"]]
    for task_id, marked in zip(task_ids, annotated, strict=True):
        if marked:
            label_studio.annotate(task_id, REGIONS)
    return project, task_ids


def retrieve(project: int, label_studio, task_id: int) -> dict:
    """ "Retrieve predictions" on one task of the stand-in project, as Label Studio 1.23.2 sends it."""
    body = batch_with_saved_annotation()
    body["project"] = f"{project}.1796000000"
    task = label_studio.task(task_id)
    body["tasks"] = [{"id": task_id, "data": task["data"], "annotations": task["annotations"], "drafts": []}]
    return body


def ended(client, project: int, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        progress = client.get(f"/track?project={project}").json
        if progress["state"] in ("finished", "failed", "stopped"):
            return progress
        time.sleep(0.2)
    raise AssertionError(f"the tracking run of project {project} did not end in {timeout_s} s")


def test_a_tracking_run_imports_the_track_of_each_annotated_video_task(client_with, label_studio):
    """The run tracks the tasks with keyframes, skips the one with none, and imports what /predict answers."""
    client, predictor = client_with()
    sure_of_presence(predictor)
    project, (first, bare, last) = video_project(label_studio, [True, False, True])

    started = client.post(f"/track?project={project}")
    assert started.status_code == 202, started.json
    progress = ended(client, project)

    assert progress["state"] == "finished", progress
    assert (progress["predicted"], progress["skipped"], progress["failed"]) == (2, 1, 0)
    assert (progress["task"], progress["frames_done"], progress["frames_total"]) == (last, FRAMES, FRAMES)
    imported = {prediction["task"]: prediction for prediction in label_studio.imported[project]}
    assert set(imported) == {first, last}
    inline = client.post("/predict", json=retrieve(project, label_studio, first))
    assert inline.status_code == 200, inline.json
    (answer,) = inline.json["results"]
    for prediction in imported.values():
        assert prediction["result"] == answer["result"]
        assert prediction["model_version"] == answer["model_version"] == progress["model_version"]
    assert [obj.region_id for obj in video_objects(answer["result"])] == [REGIONS[0]["id"]]

    again = client.post(f"/track?project={project}")  # every task tracked: nothing left to do
    assert again.status_code == 202
    assert ended(client, project)["skipped"] == 3
    assert len(label_studio.imported[project]) == 2


def test_a_run_stopped_in_the_middle_of_a_video_leaves_it_for_the_next_run(client_with, label_studio, settings):
    """A stop asked while a video is tracked ends the run within a frame step; the task stays handed over, nothing
    is imported for it, and the next run tracks it."""
    _, predictor = client_with()
    project, (task_id,) = video_project(label_studio, [True])
    task = label_studio.task(task_id)
    waiting = VideoTrackRun.waiting(ProjectFiles(settings.model_dir, project))
    waiting.add({task_id: {"id": task_id, "data": task["data"], "annotations": task["annotations"]}})
    api = ProjectApi(settings.label_studio_url, settings.label_studio_api_key)
    options = replace(VideoTrackRun.default_options(settings, predictor), handed_over_only=True)

    def run(stop_when) -> VideoTrackRun:
        made = VideoTrackRun(project, predictor, api, settings, options, should_stop=lambda: stop_when(made.progress))
        made.run()
        return made

    stopped = run(lambda progress: progress.frames_done >= 10)
    assert stopped.progress.state == "stopped", stopped.progress
    assert 10 <= stopped.progress.frames_done < FRAMES
    assert (stopped.progress.predicted, stopped.progress.failed) == (0, 0)
    assert label_studio.imported[project] == []
    assert waiting.ids() == [task_id]

    finished = run(lambda progress: False)
    assert finished.progress.state == "finished", finished.progress
    assert finished.progress.predicted == 1
    assert [prediction["task"] for prediction in label_studio.imported[project]] == [task_id]
    assert waiting.ids() == []


def test_a_track_cut_short_by_the_deadline_goes_on_in_the_tracking_run(client_with, label_studio):
    """Retrieve predictions past PREDICT_DEADLINE: 503 naming the run's progress, then the track is imported."""
    client, _ = client_with(predict_deadline_s=0.001)
    project, (task_id,) = video_project(label_studio, [True])

    response = client.post("/predict", json=retrieve(project, label_studio, task_id))

    assert response.status_code == 503, response.json
    assert response.json["background"] == {
        "project": project,
        "tasks": [task_id],
        "progress": f"/track?project={project}",
    }
    assert "goes on in the background" in response.json["error"]
    progress = ended(client, project)
    assert progress["state"] == "finished", progress
    (prediction,) = label_studio.imported[project]
    assert prediction["task"] == task_id
    (track,) = video_objects(prediction["result"])
    assert track.region_id == REGIONS[0]["id"]
    drawn = {keyframe.frame: keyframe for keyframe in video_objects(REGIONS)[0].keyframes}
    assert {frame: box for frame, box in ((k.frame, k) for k in track.keyframes) if frame in drawn} == drawn


def test_tracking_an_image_project_is_refused_naming_the_cause(client_with, label_studio):
    client, _ = client_with()
    project = label_studio.add_project(recorded("03-predict-batch.json")["label_config"], ["/data/upload/x.jpg"])
    response = client.post(f"/track?project={project}")
    assert response.status_code == 422, response.json
    assert "has no <Video> with a <VideoRectangle>" in response.json["error"]


def test_the_track_command_tracks_a_project_in_the_foreground(settings, label_studio, video_folder, recorded_video):
    """`python -m backend track --project ID`: the run in the foreground, its last progress printed as JSON."""
    project, (task_id,) = video_project(label_studio, [True])
    environment = dict(
        os.environ,
        LABEL_STUDIO_URL=settings.label_studio_url,
        LABEL_STUDIO_API_KEY=settings.label_studio_api_key,
        SAM_CHECKPOINT=settings.sam_checkpoint,
        WEIGHTS_DIR=settings.weights_dir,
        MODEL_DIR=settings.model_dir,
        REDIS_URL="",
        VIDEO_CHECKPOINT=str(video_folder),
    )
    command = [sys.executable, "-m", "backend", "track", "--project", str(project)]
    run = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)

    assert run.returncode == 0, run.stderr[-3000:]
    progress = json.loads(run.stdout.strip().splitlines()[-1])
    assert (progress["state"], progress["predicted"], progress["task"]) == ("finished", 1, task_id), progress
    assert progress["frames_done"] == progress["frames_total"] == FRAMES
    assert [prediction["task"] for prediction in label_studio.imported[project]] == [task_id]
