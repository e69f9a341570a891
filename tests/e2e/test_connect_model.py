"""Mistakes caught when the model is connected, against the real Label Studio: its "Connect Model" call (POST
/api/ml, which sends GET /health and POST /setup) fails, and its answer holds the backend's reason, for a SAM that
could not be loaded and for a label config the backend cannot serve."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import backend_environment
from tests.e2e.label_studio import LabelStudioApi
from tests.e2e.test_label_studio import LABEL_CONFIG
from tests.load_harness import GunicornServer

pytestmark = pytest.mark.e2e

KEYPOINTS_ONLY = """<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Car"/></KeyPointLabels>
</View>"""


@pytest.fixture
def connect(label_studio, personal_access_token, sam_checkpoint, grounding_dino_files, redis_server, tmp_path):
    """Connect a backend started with `overrides` to a new project of `label_config`: Label Studio's answer."""
    api = LabelStudioApi(label_studio.url, personal_access_token)
    started: list[GunicornServer] = []

    def connect_model(label_config: str, models: str, **overrides: str) -> dict:
        project = api.call("POST", "/api/projects", json={"title": "connect", "label_config": label_config})["id"]
        environment = backend_environment(
            label_studio.url, personal_access_token, sam_checkpoint, grounding_dino_files, redis_server.url, tmp_path
        )
        backend = GunicornServer(environment | overrides, tmp_path / "gunicorn.log", workers=1)
        started.append(backend)
        backend.start(models=models)
        return api.call("POST", "/api/ml", expect=400, json={"url": backend.url, "project": project, "title": "SAM"})

    yield connect_model
    for backend in started:
        backend.stop()


def test_connecting_a_backend_whose_sam_failed_to_load_shows_why(connect, tmp_path):
    missing = tmp_path / "sam_vit_b_missing.pth"
    answer = json.dumps(connect(LABEL_CONFIG, "failed", SAM_CHECKPOINT=str(missing)))
    assert "health check failed" in answer and "SAM could not be loaded" in answer and str(missing) in answer


def test_connecting_a_project_whose_label_config_has_no_brush_polygons_or_rectangles_shows_why(connect):
    answer = json.dumps(connect(KEYPOINTS_ONLY, "ready"))
    assert "no BrushLabels, PolygonLabels or RectangleLabels control for the Image 'image'" in answer
