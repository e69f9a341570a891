"""SAM 3 exemplars and text against the real Label Studio 1.23.2 (docs/models.md, "Exemplars"): a project whose
label config declares the exemplar control (a smart `RectangleLabels` with the backend's own `exemplar="true"`) is
accepted and stored with the attribute, connects to the backend with `SAM_MODEL_TYPE=sam3` and `DETECTOR=sam3`, and
Label Studio's own `POST /api/ml/{id}/interactive-annotating` with one exemplar box, then with a typed text prompt,
returns the backend's regions, labelled with the box's label (an exemplar) or the prompt's (text).

The backend is a real gunicorn with the reduced SAM 3 of tests/test_sam3_exemplars.py (random weights), reached through
the loopback tap of tests/e2e/test_video_tracking.py, which keeps what Label Studio sent to /predict and what the
backend answered. Random weights find no real object: `BOX_THRESHOLD=0` keeps SAM 3's best instances (as the unit
tests do), so this checks the path through Label Studio, not what the model sees."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.assets import REPO, decode_brush, encode, smooth_object_image
from tests.detector_weights import write_sam3
from tests.e2e.conftest import backend_environment, sam3_environment
from tests.e2e.label_studio import LabelStudioApi
from tests.e2e.test_video_tracking import Tap
from tests.load_harness import GunicornServer

pytestmark = pytest.mark.e2e

EXEMPLAR_CONTROL = """<RectangleLabels name="find" toName="image" smart="true" exemplar="true">
    <Label value="Car" background="#FF0000" showInline="true"/>
    <Label value="Wheel" background="#0000FF" showInline="true"/>
  </RectangleLabels>
  """
# The repository's label config with the exemplar control declared before the BrushLabels, as README shows it, and
# the project's thresholds (its Number controls' defaults, which override BOX_THRESHOLD) at 0 for random weights.
LABEL_CONFIG = (
    (REPO / "label_config.xml")
    .read_text()
    .replace('<BrushLabels name="tag"', EXEMPLAR_CONTROL + '<BrushLabels name="tag"', 1)
    .replace('defaultValue="0.3"', 'defaultValue="0"')
    .replace('defaultValue="0.25"', 'defaultValue="0"')
)
WIDTH, HEIGHT = 640, 480


@dataclass
class Sam3Project:
    api: LabelStudioApi
    project: int
    ml_backend: int
    task: int
    tap: Tap
    backend: GunicornServer


@pytest.fixture(scope="module")
def sam3_project(
    label_studio, personal_access_token, grounding_dino_files, redis_server, tmp_path_factory
) -> Iterator[Sam3Project]:
    """A project with the exemplar control and one uploaded image, connected to SAM 3 behind the tap."""
    api = LabelStudioApi(label_studio.url, personal_access_token)
    log_start = label_studio.log_path.stat().st_size
    created = api.call("POST", "/api/projects", json={"title": "SAM 3 exemplars", "label_config": LABEL_CONFIG})
    stored = api.call("GET", f"/api/projects/{created['id']}")["label_config"]
    assert 'exemplar="true"' in stored and 'name="find"' in stored and stored.count('defaultValue="0"') == 2, stored
    image = {"car.jpg": ("car.jpg", encode(smooth_object_image(WIDTH, HEIGHT, 4)), "image/jpeg")}
    api.call("POST", f"/api/projects/{created['id']}/import", files=image)
    (task,) = api.call("GET", "/api/tasks", params={"project": created["id"]})["tasks"]

    folder = write_sam3(tmp_path_factory.mktemp("sam3-e2e") / "sam3")
    model_dir = tmp_path_factory.mktemp("sam3-e2e-backend")
    environment = sam3_environment(
        backend_environment(
            label_studio.url, personal_access_token, folder, grounding_dino_files, redis_server.url, model_dir
        ),
        folder,
        5,
    )
    backend = GunicornServer(environment, model_dir / "gunicorn.log", workers=1).start()
    tap = Tap(backend.url)
    threading.Thread(target=tap.serve_forever, daemon=True).start()
    try:
        connected = api.call(
            "POST",
            "/api/ml",
            json={"url": tap.url, "project": created["id"], "title": "SAM 3", "is_interactive": True},
        )
        assert connected["state"] == "CO", connected
        yield Sam3Project(api, created["id"], connected["id"], task["id"], tap, backend)
    finally:
        tap.shutdown()
        tap.server_close()
        backend.stop()
    log = backend.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    with open(label_studio.log_path, "rb") as handle:
        handle.seek(log_start)
        logged = handle.read().decode(errors="replace")
    assert not [line for line in logged.splitlines() if " ERROR " in line or "Traceback" in line], logged[-3000:]


def interactive(run: Sam3Project, region: dict[str, Any]) -> list[dict[str, Any]]:
    """Label Studio's interactive-annotating with one context region: its answer's regions, after checking that the
    backend received the context as sent and that Label Studio returned the backend's answer."""
    before = len(run.tap.predictions)
    context = {"result": [region]}
    answer = run.api.call(
        "POST", f"/api/ml/{run.ml_backend}/interactive-annotating", json={"task": run.task, "context": context}
    )
    assert "errors" not in answer, answer
    (exchange,) = run.tap.predictions[before:]
    assert exchange["sent"]["params"]["context"] == context
    (sent_task,) = exchange["sent"]["tasks"]
    assert sent_task["id"] == run.task
    assert exchange["status"] == 200, exchange["answer"]
    (answered,) = exchange["answer"]["results"]
    assert answer["data"]["result"] == answered["result"]
    return answer["data"]["result"]


def assert_labelled_regions(result: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """Brush regions of `label`, each the image's size, each with its SAM 3 box in the smart RectangleLabels (a smart
    box's own answer has none). Random weights give SAM 3 instances that overlap so much that NMS keeps one (as in
    tests/test_sam3_exemplars.py), so one is enough here; the unit tests compare the instances themselves."""
    brushes = [region for region in result if region["type"] == "brushlabels"]
    boxes = [region for region in result if region["type"] == "rectanglelabels"]
    assert len(brushes) >= 1 and len(boxes) == len(brushes), result
    for region in brushes:
        assert region["from_name"] == "tag" and region["value"]["brushlabels"] == [label]
        assert decode_brush(region).shape == (HEIGHT, WIDTH)
        assert 0 <= region["score"] <= 1
    assert all(box["from_name"] == "tag3" and box["value"]["rectanglelabels"] == [label] for box in boxes)
    return brushes


def test_an_exemplar_box_through_label_studio_gives_every_object_like_it(sam3_project):
    """One Car box drawn with the exemplar control, as the smart rectangle tool sends it (fixture 05's shape)."""
    exemplar = {
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "value": {"x": 20.0, "y": 30.0, "width": 30.0, "height": 25.0, "rotation": 0, "rectanglelabels": ["Car"]},
        "id": "exemplar01",
        "from_name": "find",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }
    result = interactive(sam3_project, exemplar)
    assert all(region["from_name"] != "find" for region in result)  # no answer goes into the exemplar control
    brushes = assert_labelled_regions(result, "Car")
    print(f"\nexemplar: {len(brushes)} Car regions, scores {[round(region['score'], 3) for region in brushes]}")


def test_a_typed_text_prompt_through_label_studio_gives_sam3_regions(sam3_project):
    """The TextArea prompt "car", as the editor sends it (fixture 06's shape): SAM 3's instances of the label."""
    prompt = {
        "value": {"text": ["car"]},
        "id": "prompt0001",
        "from_name": "prompt",
        "to_name": "image",
        "type": "textarea",
        "origin": "manual",
    }
    brushes = assert_labelled_regions(interactive(sam3_project, prompt), "Car")
    print(f"\ntext: {len(brushes)} Car regions, scores {[round(region['score'], 3) for region in brushes]}")
