"""A tracked video box in a real browser, in the real Label Studio 1.23.2 labelling page: the backend's track of a
keyframe box, stored by "Retrieve predictions", is what the editor shows on every frame and what the annotator sees
move on screen.

The backend is gunicorn with the reduced SAM 2.1 video predictor (random weights): it cannot follow the shape
(tests/test_video.py proves the tracking against the library's own predictor), so the test checks what holds whatever
the model finds. The editor's own state for the prediction (its region's `getShape` and `isInLifespan`) equals what
backend.protocol.video's `shown_at` says Label Studio shows for the stored result on every frame, and on two frames
the region's outline, found by its label's colour in the page's screenshot, sits where that box is. The screenshots
of those two frames are docs/video-track-frame-*.png (`make screenshots`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page

from backend.protocol.video import VideoBox, VideoObject, video_objects
from tests.browser.labeling import BACKEND_WAIT_MS, LabelingPage, Project
from tests.e2e.conftest import backend_environment
from tests.e2e.label_studio import LabelStudioApi
from tests.hf_segmenters import write_models
from tests.load_harness import GunicornServer
from tests.synthetic_video import MovingShapes, write_moving_shapes

pytestmark = pytest.mark.browser

VIDEO_MODEL = "sam2.1-hiera-tiny-video"
FRAMERATE = 25
FRAMES = 40
HEIGHT, WIDTH = 240, 320
OUTLINE = (0, 255, 0)  # the label's colour, which the clip (white and red shapes on grey) never shows
BACKGROUND = (30, 30, 30)  # the clip's, tests.synthetic_video's
LABEL_CONFIG = f"""<View>
  <Video name="video" value="$video" framerate="{FRAMERATE}"/>
  <VideoRectangle name="box" toName="video"/>
  <Labels name="videoLabels" toName="video">
    <Label value="Car" background="#00FF00"/>
  </Labels>
</View>"""
KEYFRAMES = (1, 20)


@pytest.fixture(scope="module")
def video_backend(
    label_studio, personal_access_token, sam_checkpoint, grounding_dino_files, redis_server, tmp_path_factory
) -> Iterator[GunicornServer]:
    models = tmp_path_factory.mktemp("video-model")
    video_model = write_models(models, True, (VIDEO_MODEL,))[VIDEO_MODEL]
    environment = backend_environment(
        label_studio.url,
        personal_access_token,
        sam_checkpoint,
        grounding_dino_files,
        redis_server.url,
        tmp_path_factory.mktemp("video-backend-models"),
    ) | {"VIDEO_CHECKPOINT": str(video_model)}
    server = GunicornServer(environment, models / "gunicorn.log", workers=1)
    server.start()
    yield server
    server.stop()


def video_project(api: LabelStudioApi, backend_url: str, clip: MovingShapes) -> Project:
    """A video project of one uploaded clip, connected to the backend, with the white rectangle boxed on the
    KEYFRAMES as an annotator saves it, and the backend's track retrieved as the task's prediction."""
    project = api.call(
        "POST",
        "/api/projects",
        json={"title": "video track", "label_config": LABEL_CONFIG, "show_collab_predictions": False},
    )["id"]
    api.call("POST", f"/api/projects/{project}/import", files={"clip.mp4": ("clip.mp4", clip.path.read_bytes())})
    (task,) = api.call("GET", "/api/tasks", params={"project": project})["tasks"]
    connected = api.call("POST", "/api/ml", json={"url": backend_url, "project": project, "title": "SAM video"})
    assert connected["state"] == "CO", connected
    sequence = [
        VideoBox.from_pixels(frame, clip.box(0, frame - 1), (HEIGHT, WIDTH), enabled=True).as_json(FRAMERATE)
        for frame in KEYFRAMES
    ]
    region = {
        "id": "car0000001",
        "from_name": "box",
        "to_name": "video",
        "type": "videorectangle",
        "origin": "manual",
        "value": {"framesCount": FRAMES, "duration": FRAMES / FRAMERATE, "sequence": sequence, "labels": ["Car"]},
    }
    api.call("POST", f"/api/tasks/{task['id']}/annotations", json={"result": [region]})
    selected = {"selectedItems": {"all": False, "included": [task["id"]]}}
    api.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project}, json=selected)
    return Project(api, project, task["id"], WIDTH, HEIGHT)


# The box the editor shows for the task's prediction on each frame (getShape within isInLifespan), null for none.
SHOWN_BOXES = """frames => {
    const store = window.dataManager.lsf.lsf.annotationStore;
    const region = store.predictions[0].regions[0];
    return Object.fromEntries(frames.map(frame => {
        const shape = region.isInLifespan(frame) ? region.getShape(frame) : null;
        return [frame, shape ? [shape.x, shape.y, shape.width, shape.height] : null];
    }));
}"""


def open_prediction(page: Page, labeling: LabelingPage) -> None:
    """The task open with its prediction selected (as the annotations bar's prediction tab does), once the clip
    has loaded."""
    page.goto(labeling.url)
    page.wait_for_function(  # the annotation open and its clip loaded: the editor is set up
        "frames => window.dataManager?.lsf?.currentAnnotation?.names.get('video')?.length === frames "
        "&& window.dataManager.lsf.lsf.annotationStore.predictions.length === 1",
        arg=FRAMES,
        timeout=BACKEND_WAIT_MS,
    )
    page.evaluate(
        "() => { const store = window.dataManager.lsf.lsf.annotationStore; "
        "store.selectPrediction(store.predictions[0].id); }"
    )
    page.wait_for_function(
        "frames => window.dataManager.lsf.currentAnnotation.type === 'prediction' "
        "&& window.dataManager.lsf.currentAnnotation.names.get('video')?.length === frames",
        arg=FRAMES,
    )


def go_to(page: Page, frame: int) -> None:
    """What a click on the timeline does: the video and its regions move to `frame`."""
    page.evaluate(f"() => window.dataManager.lsf.currentAnnotation.names.get('video').setFrame({frame})")
    page.wait_for_function(f"() => window.dataManager.lsf.currentAnnotation.names.get('video').frame === {frame}")
    page.wait_for_timeout(500)  # the canvas redraws on the next animation frames


def outline_on_screen(screenshot: Path) -> tuple[float, float, float, float]:
    """The bounds of the label-coloured pixels on the video's frame as the page shows it, in percent of the frame:
    the frame is where the page shows the clip's background grey."""
    with Image.open(screenshot) as shot:
        pixels = np.asarray(shot.convert("RGB"), dtype=np.int16)
    background = np.abs(pixels - BACKGROUND).max(axis=2) <= 8
    # The frame's rows and columns are mostly background; dark text elsewhere on the page is not.
    (rows,) = (background.sum(axis=1) >= background.sum(axis=1).max() / 2).nonzero()
    (columns,) = (background.sum(axis=0) >= background.sum(axis=0).max() / 2).nonzero()
    assert rows.size and columns.size, f"the clip's frame is not on {screenshot.name}"
    top, left = rows.min(), columns.min()
    height, width = rows.max() + 1 - top, columns.max() + 1 - left
    frame = pixels[top : top + height, left : left + width]
    rows, columns = (np.abs(frame - np.array(OUTLINE)).max(axis=2) < 60).nonzero()
    assert rows.size, f"no {OUTLINE} outline on the video's frame on {screenshot.name}"
    return (
        100 * columns.min() / width,
        100 * rows.min() / height,
        100 * (columns.max() + 1) / width,
        100 * (rows.max() + 1) / height,
    )


def frames_to_show(track: VideoObject) -> tuple[int, int]:
    """A keyframe the annotator drew, and the frame of the backend's own boxes where the track shows the box
    furthest from it: what moves on screen between the two is the tracker's doing."""
    first = track.shown_at(KEYFRAMES[0])
    assert first is not None
    tracked = [
        (abs(shown.x - first.x) + abs(shown.y - first.y), frame)
        for frame in range(1, FRAMES + 1)
        if frame not in KEYFRAMES and (shown := track.shown_at(frame)) is not None
    ]
    assert tracked, "the track shows no box on any frame but the annotator's"
    return KEYFRAMES[0], max(tracked)[1]


def test_the_tracked_box_moves_across_frames_as_the_backend_answered(
    page, label_studio, personal_access_token, video_backend, tmp_path, readme_screenshot: Callable[..., Path]
):
    api = LabelStudioApi(label_studio.url, personal_access_token)
    clip = write_moving_shapes(tmp_path / "clip.mp4", frames=FRAMES, height=HEIGHT, width=WIDTH, fps=FRAMERATE)
    project = video_project(api, video_backend.url, clip)
    (prediction,) = api.call("GET", "/api/predictions", params={"task": project.task})
    (track,) = video_objects(prediction["result"])

    labeling = LabelingPage(page, label_studio.url, project, tmp_path)
    open_prediction(page, labeling)
    shown: dict[str, Any] = page.evaluate(SHOWN_BOXES, list(range(1, FRAMES + 1)))
    for frame in range(1, FRAMES + 1):
        expected = track.shown_at(frame)
        if expected is None:
            assert shown[str(frame)] is None, frame
        else:
            box = (expected.x, expected.y, expected.width, expected.height)
            assert shown[str(frame)] == pytest.approx(box, abs=1e-6), frame

    outlines = {}
    for frame in frames_to_show(track):
        go_to(page, frame)
        outlines[frame] = outline_on_screen(readme_screenshot(labeling, f"video-track-frame-{frame}"))
        expected = track.shown_at(frame)
        assert expected is not None
        # The outline is drawn on the box's edge, a pixel or two wide: within 2 % of the video either way.
        box = (expected.x, expected.y, expected.x + expected.width, expected.y + expected.height)
        assert outlines[frame] == pytest.approx(box, abs=2), (frame, outlines[frame], box)
