"""Records what the real Label Studio 1.23.2 sends an ML backend for a video project, as the fixtures
tests/fixtures/ls-protocol/20-video-*.json.

A small recording backend on loopback answers /health, /setup, /predict and /webhook and keeps each request (secrets
redacted) with its answer; /predict answers one tracked `videorectangle` per task, made by backend.protocol.video.
Against it, a throwaway Label Studio (tests/e2e/label_studio.py) gets a video project with a 2-second, 25 fps clip
uploaded twice, the backend connected, "Retrieve predictions" on the first task, the second task opened, Label
Studio's own interactive-annotating endpoint called with a video region as context, and an annotation created on the
first task through the API; then a third clip is annotated in Label Studio's editor in headless Chromium (Debian's
`chromium`, as the browser stage drives it) with Auto-Annotation on. What Label Studio stored, and which requests the
editor and the backend saw meanwhile, is read back into 20-video-99-stored.json.

    LABEL_STUDIO_VENV=/path/to/venv python -m tests.e2e.record_video_protocol [OUT_DIR]

Needs PyAV (`pip install av`) for the clip.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import numpy as np
from playwright.sync_api import Page, sync_playwright

from backend.protocol.video import VideoBox, video_objects, video_rectangle_result
from tests.browser.conftest import VIEWPORT, chromium_executable
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

    def annotation_created(self, since: int, wait_s: float = 30) -> dict[str, Any]:
        """The first ANNOTATION_CREATED webhook after call `since`: Label Studio may send it after its API answered."""
        give_up_at = time.monotonic() + wait_s
        while time.monotonic() < give_up_at:
            for call in self.calls_to("/webhook", since):
                if (call["label_studio_sent"]["json"] or {}).get("action") == "ANNOTATION_CREATED":
                    return call
            time.sleep(0.2)
        raise AssertionError(f"no ANNOTATION_CREATED webhook within {wait_s} s")


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


@contextmanager
def editor_on(label_studio: LabelStudioProcess, project: int, task: int) -> Iterator[Page]:
    """Label Studio's labelling page in headless Chromium, signed in, open on `task` once its clip has loaded."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_executable())
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(f"{label_studio.url}/user/login/")
            page.fill("input[name=email]", label_studio.username)
            page.fill("input[name=password]", label_studio.password)
            with page.expect_navigation():
                page.click("button[type=submit]")
            page.goto(f"{label_studio.url}/projects/{project}/data?task={task}")
            page.wait_for_function(  # the clip loaded: the editor knows its frames
                "frames => window.dataManager?.lsf?.currentAnnotation?.names.get('video')?.length === frames",
                arg=FRAMES,
            )
            yield page
        finally:
            browser.close()


# Per prediction the editor loaded: its model version, regions, and the x (percent) of the box it shows on some frames
# (null where it shows none), from the region's own getShape and isInLifespan.
SHOWN_PREDICTIONS = """frames => window.dataManager.lsf.lsf.annotationStore.predictions.map(prediction => {
    const region = prediction.regions[0];
    const shown = frame => region.isInLifespan(frame) && region.getShape(frame) ? region.getShape(frame).x : null;
    return {
        regions: prediction.regions.length,
        type: region.type,
        label: region.labelName,
        x_on_frame: Object.fromEntries(frames.map(frame => [frame, shown(frame)])),
    };
})"""


def predictions_in_editor(label_studio: LabelStudioProcess, project: int, task: int) -> list[dict[str, Any]]:
    """How the editor shows the task's predictions."""
    with editor_on(label_studio, project, task) as page:
        return page.evaluate(SHOWN_PREDICTIONS, [1, 10, 39, 40, 41, FRAMES])


def draw_in_editor(label_studio: LabelStudioProcess, project: int, task: int) -> list[dict[str, Any]]:
    """An annotator's region drawn in Label Studio's own editor (headless Chromium) and submitted: the block boxed on
    frame 1, moved to its place on frame 20, and its lifespan ended on frame 40 with the timeline's Toggle Keypoint
    and Toggle Interpolation buttons, with the Auto-Annotation switch on. Returns the requests other than GET the page
    sent to Label Studio's API once the task was open (the annotation, drafts, any interactive-annotating)."""
    sent: list[dict[str, Any]] = []
    with editor_on(label_studio, project, task) as page:
        page.on(
            "request",
            lambda request: (
                sent.append({"method": request.method, "url": request.url, "body": request.post_data})
                if request.url.startswith(label_studio.url + "/api/") and request.method != "GET"
                else None
            ),
        )
        page.get_by_test_id("bottombar-auto-annotation-toggle").check()
        stage = page.locator(".konvajs-content").bounding_box()
        assert stage is not None
        height, width = SIZE
        # The clip is shown at zoom 1 in the middle of the stage: screen points of its pixels.
        left, top = stage["x"] + (stage["width"] - width) / 2, stage["y"] + (stage["height"] - height) / 2

        def drag(start: tuple[float, float], end: tuple[float, float]) -> None:
            page.mouse.move(left + start[0], top + start[1])
            page.mouse.down()
            page.mouse.move(left + end[0], top + end[1], steps=10)
            page.mouse.up()

        def go_to(frame: int) -> None:  # what a click on the timeline does
            page.evaluate(f"() => window.dataManager.lsf.currentAnnotation.names.get('video').setFrame({frame})")
            page.wait_for_function(
                f"() => window.dataManager.lsf.currentAnnotation.names.get('video').frame === {frame}"
            )

        page.locator(".lsf-labels").first.locator(".lsf-label", has_text="Car").click()
        x0, y0, x1, y1 = car_box(0)
        drag((x0, y0), (x1, y1))
        page.locator(".lsf-outliner-tree [role=treeitem]").first.wait_for()
        go_to(20)
        page.mouse.click(left + (x0 + x1) / 2, top + (y0 + y1) / 2)  # select the region, then move it
        page.wait_for_timeout(500)
        drag(((x0 + x1) / 2, (y0 + y1) / 2), ((car_box(19)[0] + car_box(19)[2]) / 2, (y0 + y1) / 2))
        page.wait_for_function("() => window.dataManager.lsf.currentAnnotation.regions[0].sequence.length === 2")
        go_to(40)
        # The timeline's icon buttons have no label (only a tooltip): zoom, Toggle Keypoint, Toggle Interpolation.
        icons = page.locator('button[aria-label="Hop backward"]').locator(
            'xpath=ancestor::div[.//button[@aria-label="Video settings"]][1]//button[not(@aria-label)]'
        )
        keyframe_40 = "window.dataManager.lsf.currentAnnotation.regions[0].sequence.find(k => k.frame === 40)"
        icons.nth(1).click()
        page.wait_for_function(f"() => {keyframe_40}?.enabled === true")
        icons.nth(2).click()
        page.wait_for_function(f"() => {keyframe_40}?.enabled === false")
        with page.expect_response(lambda answer: answer.request.method == "POST" and "/annotations" in answer.url):
            page.get_by_test_id("bottombar-submit-button").click()
    return sent


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
        save(
            out_dir,
            "20-video-webhook-annotation-created.json",
            "webhook for POST /api/tasks/{id}/annotations with a videorectangle result",
            recorder.annotation_created(mark),
        )

        # The same prediction without the fields the editor does not read, beside the one the backend gave.
        bare = tracked_prediction({})["result"]
        for region in bare:
            del region["value"]["framesCount"], region["value"]["duration"]
            for keyframe in region["value"]["sequence"]:
                del keyframe["time"]
        api.call("POST", "/api/predictions", json={"task": tasks[0], "result": bare, "model_version": "bare"})
        shown = predictions_in_editor(label_studio, project, tasks[0])

        api.call("PATCH", f"/api/projects/{project}", json={"show_collab_predictions": False})  # an empty editor
        api.call(
            "POST",
            f"/api/projects/{project}/import",
            files={"clip-c.mp4": ("clip-c.mp4", clip.read_bytes(), "video/mp4")},
        )
        listed = api.call("GET", "/api/tasks", params={"project": project})["tasks"]
        (drawn_task,) = {task["id"] for task in listed} - set(tasks)
        mark = len(recorder.calls)
        editor_sent = draw_in_editor(label_studio, project, drawn_task)
        save(
            out_dir,
            "20-video-webhook-annotation-created-in-editor.json",
            "webhook for a VideoRectangle region drawn and submitted in Label Studio's editor (headless Chromium)",
            recorder.annotation_created(mark),
        )
        editor_calls = [call["label_studio_sent"]["path"] for call in recorder.calls[mark:]]

        stored = {
            "description": "what Label Studio stored and answers through its API after the recording",
            "label_config": LABEL_CONFIG,
            "tasks": [api.call("GET", f"/api/tasks/{task}") for task in tasks],
            "predictions": api.call("GET", "/api/predictions", params={"project": project}),
            "annotation": api.call("GET", f"/api/annotations/{annotation['id']}"),
            "interactive_annotating_answer": interactive,
            "predictions_in_editor": {
                "description": "task 1's two predictions (the backend's, and the same without framesCount, duration "
                "and time) as the editor shows them: the x (percent) of the box on some frames, null where none is",
                "shown": shown,
            },
            "editor_task": api.call("GET", f"/api/tasks/{drawn_task}"),
            "editor_sent": [
                {"method": request["method"], "path": request["url"][len(label_studio.url) :].partition("?")[0]}
                for request in editor_sent
            ],
            "backend_received_while_editing": editor_calls,
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
