"""Mistakes caught when Label Studio connects the model ("Connect Model" sends GET /health, then POST /setup),
not while annotating: Label Studio shows a failed call as requests' "<status> ... Error: <reason> for url: ..."
and never the body, so the message must be in the status line's reason phrase."""

from __future__ import annotations

from dataclasses import replace

import pytest

from backend.cache.store import MemoryStore
from backend.http.server import create_app
from backend.inference.local import Predictor
from tests.assets import recorded


def test_health_of_a_backend_whose_sam_failed_to_load_is_an_error_naming_the_file(settings, tmp_path):
    missing = tmp_path / "no-such-sam.pth"
    predictor = Predictor(replace(settings, sam_checkpoint=str(missing)), MemoryStore(1 << 20))
    client = create_app(settings, predictor).test_client()
    with pytest.raises(Exception, match="load"):
        predictor.models.get(60)
    health = client.get("/health")
    assert health.status_code == 500
    assert health.json["models"] == "failed"
    assert str(missing) in health.json["error"]
    reason = health.status.split(" ", 1)[1]
    assert reason.startswith("SAM could not be loaded") and str(missing) in reason


def test_health_while_sam_loads_or_once_loaded_is_up(client):
    health = client.get("/health")
    assert health.status_code == 200 and health.json["status"] == "UP" and health.json["models"] == "ready"


UNUSABLE_CONFIGS = {
    "broken XML": ('<View><Image name="image" value="$image"/><BrushLabels name="tag"', "not a valid"),
    "smart keypoints only": (
        '<View><Image name="image" value="$image"/>'
        '<KeyPointLabels name="click" toName="image" smart="true"><Label value="Car"/></KeyPointLabels></View>',
        "no BrushLabels, PolygonLabels or RectangleLabels control for the Image 'image'",
    ),
    "no image": (
        '<View><Text name="text" value="$text"/><Choices name="c" toName="text"><Choice value="a"/></Choices></View>',
        "no Image tag",
    ),
}


@pytest.mark.parametrize("name", UNUSABLE_CONFIGS)
def test_setup_with_an_unusable_label_config_is_a_422_saying_what_to_add(client, name):
    schema, expected = UNUSABLE_CONFIGS[name]
    response = client.post("/setup", json={**recorded("02-setup.json"), "schema": schema})
    assert response.status_code == 422, response.get_data(as_text=True)
    assert expected in response.json["error"]
    assert expected in response.status  # the reason phrase, which Label Studio shows


@pytest.mark.parametrize(
    "schema",
    [
        recorded("02-setup.json")["schema"],
        '<View><Image name="img" value="$url"/>'
        '<RectangleLabels name="box" toName="img"><Label value="Car"/></RectangleLabels></View>',
        '<View><Image name="img" value="$url"/>'
        '<PolygonLabels name="outline" toName="img"><Label value="Car"/></PolygonLabels></View>',
    ],
    ids=["recorded", "rectangles only", "polygons only"],
)
def test_setup_with_a_usable_label_config_answers_the_model_version(client, schema):
    response = client.post("/setup", json={**recorded("02-setup.json"), "schema": schema})
    assert response.status_code == 200 and response.json["model_version"]


def test_the_reason_phrase_is_one_line_of_printable_ascii(client):
    schema = '<View><Image name="bild\u00e4\nx" value="$image"/></View>'
    response = client.post("/setup", json={**recorded("02-setup.json"), "schema": schema})
    assert response.status_code == 422
    reason = response.status.split(" ", 1)[1]
    assert reason and all(" " <= char <= "~" for char in reason)
