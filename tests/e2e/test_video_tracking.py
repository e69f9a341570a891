"""Video tracking against the real Label Studio 1.23.2 (docs/video.md, "How an annotator uses it"): a <Video> project
with an uploaded clip connects to the backend; an annotation with keyframe boxes saved through the API, then the data
manager's "Retrieve predictions" on the task, stores the backend's track as one `videorectangle` prediction that keeps
the annotator's region, label and keyframes as drawn.

The backend is a real gunicorn with the reduced SAM 2.1 video predictor (random weights), reached through a loopback
tap that keeps what Label Studio sent to /predict and what the backend answered. Random weights cannot follow a shape
(tests/test_video.py proves the tracking itself, against the library's own predictor), so this checks what holds
whatever the model finds: the region and its keyframes, the frame numbering, and that Label Studio stored the
backend's answer as it was given."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from backend.protocol.video import VideoBox
from tests.e2e.conftest import backend_environment
from tests.e2e.label_studio import LabelStudioApi
from tests.hf_segmenters import write_models
from tests.load_harness import GunicornServer
from tests.synthetic_video import write_moving_shapes

pytestmark = pytest.mark.e2e

VIDEO_MODEL = "sam2.1-hiera-tiny-video"
FRAMERATE = 25
FRAMES = 40  # 1.6 s at 25 fps: Label Studio's frames 1..40
HEIGHT, WIDTH = 48, 64
LABEL_CONFIG = f"""<View>
  <Video name="video" value="$video" framerate="{FRAMERATE}"/>
  <VideoRectangle name="box" toName="video"/>
  <Labels name="videoLabels" toName="video">
    <Label value="Car"/>
    <Label value="Person"/>
  </Labels>
</View>"""
KEYFRAMES = (1, 20)  # Label Studio's frame numbers of the annotator's boxes, both enabled
TRACK_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def video_model(tmp_path_factory):
    """The reduced SAM 2.1 video predictor with random weights, as `save_pretrained` writes it."""
    return write_models(tmp_path_factory.mktemp("video-model"), True, (VIDEO_MODEL,))[VIDEO_MODEL]


class Tap(ThreadingHTTPServer):
    """A loopback proxy in front of the backend: forwards every request as it came and keeps each /predict
    exchange (what Label Studio sent, the backend's status and answer)."""

    daemon_threads = True

    def __init__(self, target: str) -> None:
        super().__init__(("127.0.0.1", 0), TapHandler)
        self.target = target
        self.predictions: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class TapHandler(BaseHTTPRequestHandler):
    server: Tap

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass

    def do_GET(self) -> None:
        self.forward()

    def do_POST(self) -> None:
        self.forward()

    def forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {key: value for key, value in self.headers.items() if key.lower() not in ("host", "content-length")}
        answer = requests.request(
            self.command, self.server.target + self.path, data=body, headers=headers, timeout=TRACK_TIMEOUT_S
        )
        if self.path.partition("?")[0] == "/predict":
            self.server.predictions.append(
                {"sent": json.loads(body), "status": answer.status_code, "answer": answer.json()}
            )
        self.send_response(answer.status_code)
        self.send_header("Content-Type", answer.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(answer.content)))
        self.end_headers()
        self.wfile.write(answer.content)


@pytest.fixture
def tapped_backend(
    label_studio, personal_access_token, sam_checkpoint, grounding_dino_files, redis_server, video_model, tmp_path
) -> Iterator[tuple[GunicornServer, Tap]]:
    environment = backend_environment(
        label_studio.url, personal_access_token, sam_checkpoint, grounding_dino_files, redis_server.url, tmp_path
    ) | {"VIDEO_CHECKPOINT": str(video_model)}
    backend = GunicornServer(environment, tmp_path / "gunicorn.log", workers=1).start()
    tap = Tap(backend.url)
    threading.Thread(target=tap.serve_forever, daemon=True).start()
    try:
        yield backend, tap
    finally:
        tap.shutdown()
        tap.server_close()
        backend.stop()


def test_retrieve_predictions_tracks_the_keyframes_saved_on_a_video_task(
    label_studio, personal_access_token, tapped_backend, tmp_path
):
    """Connect, annotate, Retrieve predictions: the stored prediction is the backend's answer, one track keeping the
    annotator's region and keyframes. Then a keyframe added to the annotation is tracked once the task's prediction
    is deleted; before that, Label Studio does not ask the backend again."""
    backend, tap = tapped_backend
    api = LabelStudioApi(label_studio.url, personal_access_token)
    log_start = label_studio.log_path.stat().st_size
    started = time.monotonic()

    # 1. A video project with an uploaded clip connects: /setup accepts the video config.
    clip = write_moving_shapes(tmp_path / "shapes.mp4", frames=FRAMES, height=HEIGHT, width=WIDTH, fps=FRAMERATE)
    project = api.call("POST", "/api/projects", json={"title": "video tracking", "label_config": LABEL_CONFIG})["id"]
    upload = {"shapes.mp4": ("shapes.mp4", clip.path.read_bytes(), "video/mp4")}
    api.call("POST", f"/api/projects/{project}/import", files=upload)
    (task,) = api.call("GET", "/api/tasks", params={"project": project})["tasks"]
    assert task["data"]["video"].startswith("/data/upload/"), task["data"]
    connected = api.call("POST", "/api/ml", json={"url": tap.url, "project": project, "title": "SAM video"})
    assert connected["state"] == "CO", connected

    def act(action: str) -> None:  # a data manager action on the task, as its menu runs it
        selected = {"selectedItems": {"all": False, "included": [task["id"]]}}
        api.call("POST", "/api/dm/actions", params={"id": action, "project": project}, json=selected)

    def keyframe(frame: int) -> dict[str, Any]:  # the white rectangle's box on Label Studio's frame `frame`
        box = VideoBox.from_pixels(frame, clip.box(0, frame - 1), (HEIGHT, WIDTH), enabled=True)
        return box.as_json(FRAMERATE)

    # 2. The annotator's region: the white rectangle boxed on frames 1 and 20, labelled Car, as the editor saves it.
    region = {
        "id": "car0000001",
        "from_name": "box",
        "to_name": "video",
        "type": "videorectangle",
        "origin": "manual",
        "value": {
            "framesCount": FRAMES,
            "duration": FRAMES / FRAMERATE,
            "sequence": [keyframe(frame) for frame in KEYFRAMES],
            "labels": ["Car"],
        },
    }
    annotation = api.call("POST", f"/api/tasks/{task['id']}/annotations", json={"result": [region]})
    assert api.call("GET", f"/api/annotations/{annotation['id']}")["result"] == [region]  # kept as sent

    # 3. Retrieve predictions: Label Studio sends the task with its annotation, and stores the backend's answer.
    clicked = time.monotonic()
    act("retrieve_tasks_predictions")
    tracked_s = time.monotonic() - clicked
    (prediction,) = api.call("GET", "/api/predictions", params={"task": task["id"]})
    (exchange,) = tap.predictions
    (answered,) = answered_results(exchange, task["id"], region)
    assert prediction["result"] == answered["result"]
    assert prediction["model_version"] == answered["model_version"] == connected["model_version"] != ""
    assert prediction["score"] == pytest.approx(answered["score"]) and 0 < prediction["score"] <= 1
    (track,) = prediction["result"]
    assert_keeps_the_region(track, region)

    # 4. A keyframe on frame 30 added to the annotation. Label Studio sends no task that already holds a prediction
    # of the backend's model version (ml/models.py predict_tasks): Retrieve predictions changes nothing until the
    # task's prediction is deleted, then the track keeps the three keyframes.
    corrected = json.loads(json.dumps(region))
    corrected["value"]["sequence"].append(keyframe(30))
    api.call("PATCH", f"/api/annotations/{annotation['id']}", json={"result": [corrected]})
    act("retrieve_tasks_predictions")
    assert len(tap.predictions) == 1
    assert api.call("GET", "/api/predictions", params={"task": task["id"]}) == [prediction]
    act("delete_tasks_predictions")
    act("retrieve_tasks_predictions")
    assert len(tap.predictions) == 2, tap.predictions[2:]
    (answered_again,) = answered_results(tap.predictions[1], task["id"], corrected)
    (prediction_again,) = api.call("GET", "/api/predictions", params={"task": task["id"]})
    assert prediction_again["result"] == answered_again["result"]
    (track_again,) = prediction_again["result"]
    assert_keeps_the_region(track_again, corrected)
    print(
        f"\nvideo tracking: Retrieve predictions answered in {tracked_s:.1f} s, the test took "
        f"{time.monotonic() - started:.1f} s; tracked frames {[item['frame'] for item in track['value']['sequence']]}"
    )

    with open(label_studio.log_path, "rb") as handle:
        handle.seek(log_start)
        logged = handle.read().decode(errors="replace")
    assert not [line for line in logged.splitlines() if " ERROR " in line or "Traceback" in line], logged[-3000:]
    backend_log = backend.log_path.read_text(errors="replace")
    assert "Traceback" not in backend_log, backend_log[-3000:]


def answered_results(exchange: dict[str, Any], task_id: int, region: dict[str, Any]) -> list[dict[str, Any]]:
    """The backend's results for one /predict Label Studio sent for the task, checking that it sent the task with its
    annotation (whose keyframes the backend tracks), and no context."""
    (sent_task,) = exchange["sent"]["tasks"]
    assert sent_task["id"] == task_id and exchange["sent"]["params"]["context"] is None
    assert [annotation["result"] for annotation in sent_task["annotations"]] == [[region]]
    assert exchange["status"] == 200, exchange["answer"]
    return exchange["answer"]["results"]


def assert_keeps_the_region(track: dict[str, Any], region: dict[str, Any]) -> None:
    """One track of the annotator's region: its id, names, type and label, the video's length, its keyframes as
    drawn, and every box on one of the video's frames, one a frame, in order."""
    names = ("id", "from_name", "to_name", "type")
    assert {key: track[key] for key in names} == {key: region[key] for key in names}
    assert track["value"]["labels"] == region["value"]["labels"]
    assert track["value"]["framesCount"] == FRAMES
    assert track["value"]["duration"] == pytest.approx(FRAMES / FRAMERATE)
    frames = [item["frame"] for item in track["value"]["sequence"]]
    assert frames == sorted(set(frames)) and all(1 <= frame <= FRAMES for frame in frames), frames
    by_frame = {item["frame"]: item for item in track["value"]["sequence"]}
    for keyframe in region["value"]["sequence"]:
        assert by_frame[keyframe["frame"]] == keyframe
