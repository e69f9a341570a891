"""Records what the real Label Studio 1.23.2 sends an ML backend for a video project, as the fixtures
tests/fixtures/ls-protocol/20-video-*.json.

A small recording backend on loopback answers /health, /setup, /predict and /webhook and keeps each request (secrets
redacted) with its answer; /predict answers one tracked `videorectangle` per task, made by backend.protocol.video.
Against it, a throwaway Label Studio (tests/e2e/label_studio.py) gets a video project with a 2-second, 25 fps clip
uploaded twice, the backend connected, "Retrieve predictions" on the first task, the second task opened, Label
Studio's own interactive-annotating endpoint called with a video region as context, and an annotation created on the
first task through the API; what Label Studio stored is read back into 20-video-99-stored.json.

    LABEL_STUDIO_VENV=/path/to/venv python -m tests.e2e.record_video_protocol [OUT_DIR]

Needs PyAV (`pip install av`) for the clip.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import numpy as np

from backend.protocol.video import VideoBox, video_objects, video_rectangle_result
from tests.e2e.label_studio import LabelStudioApi, LabelStudioProcess, ensure_label_studio

OUT_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "ls-protocol"
FRAMERATE = 25
FRAMES = 50
SIZE = (120, 160)  # height, width
MODEL_VERSION = "video-recorder-0"
LABEL_CONFIG = f"""<View>
  <Video name="video" value="$video" framerate="{FRAMERATE}"/>
  <VideoRectangle name="box" toName="video"/>
  <Labels name="videoLabels" toName="video">
    <Label value="Car" background="#FF0000"/>
    <Label value="Person" background="#0000FF"/>
  </Labels>
</View>"""
SECRET_HEADERS = {"authorization", "cookie", "x-api-key"}
SECRET_FIELDS = {"access_token", "api_key", "token"}


def car_box(index: int) -> tuple[float, float, float, float]:
    """The red block's pixel box on 0-based frame `index`: it slides right, 2 pixels a frame."""
    return 10.0 + 2 * index, 30.0, 50.0 + 2 * index, 60.0


def write_clip(path: Path) -> None:
    """An H.264 MP4 the browser can play: a red block sliding right over a grey frame, a blue one still."""
    height, width = SIZE
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FRAMERATE)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(FRAMES):
            image = np.full((height, width, 3), 128, np.uint8)
            x0, y0, x1, y1 = (int(v) for v in car_box(index))
            image[y0:y1, x0:x1] = (220, 30, 30)
            image[80:110, 110:130] = (30, 30, 220)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def redacted(body: Any) -> Any:
    if isinstance(body, dict):
        return {key: "<redacted>" if key in SECRET_FIELDS else redacted(value) for key, value in body.items()}
    if isinstance(body, list):
        return [redacted(item) for item in body]
    return body


class Recorder(ThreadingHTTPServer):
    """The recording ML backend: every request and its answer, in arrival order."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def calls_to(self, path: str, since: int = 0) -> list[dict[str, Any]]:
        with self.lock:
            return [call for call in self.calls[since:] if call["label_studio_sent"]["path"] == path]


def tracked_prediction(task: dict[str, Any]) -> dict[str, Any]:
    """The answer for one task: the red block tracked over frames 1-40 from a keyframe on frame 1, lost after."""
    (drawn,) = video_objects([ANNOTATED_REGION])
    boxes = [VideoBox.from_pixels(index + 1, car_box(index), SIZE) for index in range(40)]
    result = video_rectangle_result(
        drawn, boxes, frames_count=FRAMES, duration=FRAMES / FRAMERATE, framerate=FRAMERATE, score=0.9
    )
    return {"result": [result], "score": 0.9, "model_version": MODEL_VERSION}


class RecordingHandler(BaseHTTPRequestHandler):
    server: Recorder

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass

    def do_GET(self) -> None:
        self.answer(None)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self.answer(json.loads(raw) if raw else None)

    def answer(self, body: Any) -> None:
        started = time.perf_counter()
        path, _, query = self.path.partition("?")
        if path == "/health":
            status, answer = 200, {"status": "UP", "model_class": "VideoRecorder"}
        elif path == "/setup":
            status, answer = 200, {"model_version": MODEL_VERSION}
        elif path == "/predict" and isinstance(body, dict):
            status, answer = 200, {"results": [tracked_prediction(task) for task in body.get("tasks", [])]}
        elif path == "/webhook":
            status, answer = 200, {"status": "ok"}
        else:
            status, answer = 404, {"error": f"no route {path}"}
        encoded = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        self.wfile.write(encoded)
        headers = {key: "<redacted>" if key.lower() in SECRET_HEADERS else value for key, value in self.headers.items()}
        call = {
            "label_studio_sent": {
                "method": self.command,
                "path": path,
                "query": query,
                "headers": headers,
                "json": redacted(body),
            },
            "backend_answered": {
                "status": status,
                "json": answer,
                "seconds": round(time.perf_counter() - started, 3),
            },
        }
        with self.server.lock:
            self.server.calls.append(call)


# The region an annotator draws: keyframes on frames 1 and 20 (the block's real place) and a lifespan that ends on
# frame 40, in the JSON the 1.23.2 editor serializes (VideoRegion.serialize, Result.serialize with the Video tag's
# mergeLabelsAndResults: one result, labels inside, time = frame / framerate).
def annotated_keyframe(index: int, enabled: bool) -> dict[str, Any]:
    box = VideoBox.from_pixels(index + 1, car_box(index), SIZE, enabled=enabled)
    return box.as_json(FRAMERATE)


ANNOTATED_REGION: dict[str, Any] = {
    "id": "car0000001",
    "from_name": "box",
    "to_name": "video",
    "type": "videorectangle",
    "origin": "manual",
    "value": {
        "framesCount": FRAMES,
        "duration": FRAMES / FRAMERATE,
        "sequence": [annotated_keyframe(0, True), annotated_keyframe(19, True), annotated_keyframe(39, False)],
        "labels": ["Car"],
    },
}


def save(out_dir: Path, name: str, description: str, call: dict[str, Any]) -> None:
    path = out_dir / name
    path.write_text(json.dumps({"description": description, **call}, indent=2) + "\n")
    print(f"wrote {path}")


def record(out_dir: Path, work_dir: Path) -> None:
    clip = work_dir / "clip.mp4"
    write_clip(clip)
    label_studio = LabelStudioProcess(ensure_label_studio(), work_dir).start()
    recorder = Recorder()
    threading.Thread(target=recorder.serve_forever, daemon=True).start()
    try:
        token = LabelStudioApi(label_studio.url, label_studio.legacy_token).call("POST", "/api/token/")["token"]
        api = LabelStudioApi(label_studio.url, token)
        project = api.call("POST", "/api/projects", json={"title": "video", "label_config": LABEL_CONFIG})["id"]
        for name in ("clip-a.mp4", "clip-b.mp4"):
            api.call("POST", f"/api/projects/{project}/import", files={name: (name, clip.read_bytes(), "video/mp4")})
        tasks = sorted(task["id"] for task in api.call("GET", "/api/tasks", params={"project": project})["tasks"])
        connected = api.call(
            "POST", "/api/ml", json={"url": recorder.url, "project": project, "title": "video", "is_interactive": True}
        )
        assert connected["state"] == "CO", connected
        save(
            out_dir,
            "20-video-setup.json",
            "POST /setup sent when the ML backend is connected to a video project",
            recorder.calls_to("/setup")[-1],
        )

        mark = len(recorder.calls)
        api.call(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": {"all": False, "included": [tasks[0]]}},
        )
        save(
            out_dir,
            "20-video-predict-batch.json",
            "POST /predict sent by the data manager's Retrieve predictions on one video task",
            recorder.calls_to("/predict", mark)[-1],
        )

        mark = len(recorder.calls)
        api.call("GET", f"/api/tasks/{tasks[1]}")
        opened = recorder.calls_to("/predict", mark)
        if opened:
            save(
                out_dir,
                "20-video-predict-on-task-open.json",
                "POST /predict triggered by GET /api/tasks/{id} for a video task without predictions",
                opened[-1],
            )

        mark = len(recorder.calls)
        interactive = api.call(
            "POST",
            f"/api/ml/{connected['id']}/interactive-annotating",
            json={"task": tasks[0], "context": {"result": [ANNOTATED_REGION]}},
        )
        save(
            out_dir,
            "20-video-predict-interactive.json",
            "POST /predict sent by POST /api/ml/{id}/interactive-annotating with a video region as context "
            "(Label Studio's API; its editor never calls it for VideoRectangle)",
            recorder.calls_to("/predict", mark)[-1],
        )

        mark = len(recorder.calls)
        annotation = api.call("POST", f"/api/tasks/{tasks[0]}/annotations", json={"result": [ANNOTATED_REGION]})
        give_up_at = time.monotonic() + 30
        while not recorder.calls_to("/webhook", mark) and time.monotonic() < give_up_at:
            time.sleep(0.2)
        save(
            out_dir,
            "20-video-webhook-annotation-created.json",
            "webhook for POST /api/tasks/{id}/annotations with a videorectangle result",
            recorder.calls_to("/webhook", mark)[-1],
        )

        stored = {
            "description": "what Label Studio stored and answers through its API after the recording",
            "label_config": LABEL_CONFIG,
            "tasks": [api.call("GET", f"/api/tasks/{task}") for task in tasks],
            "predictions": api.call("GET", "/api/predictions", params={"project": project}),
            "annotation": api.call("GET", f"/api/annotations/{annotation['id']}"),
            "interactive_annotating_answer": interactive,
            "calls": [
                {"method": call["label_studio_sent"]["method"], "path": call["label_studio_sent"]["path"]}
                for call in recorder.calls
            ],
        }
        (out_dir / "20-video-99-stored.json").write_text(json.dumps(redacted(stored), indent=2) + "\n")
    finally:
        recorder.shutdown()
        label_studio.stop()


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ls-video-") as work:
        record(out, Path(work))
