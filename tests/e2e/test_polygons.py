"""Polygons against the real Label Studio: in a PolygonLabels project, "Retrieve predictions" stores polygon
predictions, the project's COCO export (Label Studio's export API, after its "Create Annotations From Predictions"
action) holds their segmentation in pixels, and a smart keypoint sent through Label Studio's interactive-annotating
comes back as polygons."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from tests.assets import encode, smooth_object_image
from tests.e2e.conftest import backend_environment
from tests.e2e.label_studio import LabelStudioApi
from tests.load_harness import GunicornServer

pytestmark = pytest.mark.e2e

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="outline" toName="image">
    <Label value="Car"/>
    <Label value="Wheel"/>
  </PolygonLabels>
  <KeyPointLabels name="click" toName="image" smart="true">
    <Label value="Car" smart="true"/>
    <Label value="Wheel" smart="true"/>
  </KeyPointLabels>
</View>"""
SIZES = {"car_a.jpg": (320, 240), "car_b.jpg": (400, 300)}  # file -> (width, height)


def assert_polygons(regions: list[dict], size: tuple[int, int]) -> None:
    assert regions and {region["type"] for region in regions} == {"polygonlabels"}, regions
    for region in regions:
        value = region["value"]
        assert value["closed"] is True and value["polygonlabels"][0] in ("Car", "Wheel")
        assert (region["original_width"], region["original_height"]) == size
        assert len(value["points"]) >= 3 and all(0 <= x <= 100 and 0 <= y <= 100 for x, y in value["points"])


@pytest.fixture(scope="module")
def project(label_studio, personal_access_token, sam_checkpoint, grounding_dino_files, redis_server, tmp_path_factory):
    api = LabelStudioApi(label_studio.url, personal_access_token)
    project = api.call("POST", "/api/projects", json={"title": "polygons", "label_config": LABEL_CONFIG})["id"]
    files = {
        name: (name, encode(smooth_object_image(width, height, seed)), "image/jpeg")
        for seed, (name, (width, height)) in enumerate(SIZES.items())
    }
    api.call("POST", f"/api/projects/{project}/import", files=files)
    tasks = api.call("GET", "/api/tasks", params={"project": project, "page_size": 100})["tasks"]
    sizes = {task["id"]: next(SIZES[name] for name in SIZES if task["data"]["image"].endswith(name)) for task in tasks}
    environment = backend_environment(
        label_studio.url,
        personal_access_token,
        sam_checkpoint,
        grounding_dino_files,
        redis_server.url,
        tmp_path_factory.mktemp("polygon-models"),
    )
    backend = GunicornServer(environment, tmp_path_factory.mktemp("polygon-backend") / "gunicorn.log", workers=1)
    try:
        backend.start()
        connected = api.call(
            "POST", "/api/ml", json={"url": backend.url, "project": project, "title": "SAM", "is_interactive": True}
        )
        assert connected["state"] == "CO", connected
        yield api, project, connected["id"], sizes
    finally:
        backend.stop()


def coco_export(api: LabelStudioApi, project: int) -> dict:
    """The project's COCO export: Label Studio answers a zip holding result.json (or the JSON itself)."""
    response = api.http.get(
        f"{api.url}/api/projects/{project}/export", params={"exportType": "COCO"}, headers=api.credentials.header()
    )
    assert response.status_code == 200, response.text[:500]
    if not zipfile.is_zipfile(io.BytesIO(response.content)):
        return response.json()
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        (name,) = [name for name in archive.namelist() if name.endswith(".json")]
        return json.loads(archive.read(name))


def data_manager_action(api: LabelStudioApi, project: int, action: str) -> dict:
    """A Data Manager action on every task, as a user picks it from the Actions menu."""
    selected = {"selectedItems": {"all": True, "excluded": []}}
    return api.call("POST", "/api/dm/actions", params={"id": action, "project": project}, json=selected)


def test_retrieve_predictions_stores_polygons_and_the_coco_export_holds_their_segmentation(project):
    api, project_id, _, sizes = project
    selected = {"selectedItems": {"all": True, "excluded": []}}
    answer = api.call(
        "POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project_id}, json=selected
    )
    assert answer["processed_items"] == len(sizes), answer
    predictions = api.call("GET", "/api/predictions", params={"project": project_id})
    assert {prediction["task"] for prediction in predictions} == set(sizes)
    polygons = 0
    for prediction in predictions:
        assert_polygons(prediction["result"], sizes[prediction["task"]])
        polygons += len(prediction["result"])

    api.call(
        "POST", "/api/dm/actions", params={"id": "predictions_to_annotations", "project": project_id}, json=selected
    )
    coco = coco_export(api, project_id)
    images = {image["id"]: image for image in coco["images"]}
    assert len(coco["annotations"]) == polygons
    # label-studio-sdk 2.x's COCO converter merges the labels of a KeyPointLabels control into one keypoint
    # category named "default", polygons of the same label names included (docs/polygons.md says so).
    categories = {category["id"] for category in coco["categories"]}
    for annotation in coco["annotations"]:
        assert annotation["category_id"] in categories
        (segmentation,) = annotation["segmentation"]
        image = images[annotation["image_id"]]
        xs, ys = segmentation[0::2], segmentation[1::2]
        assert len(xs) >= 3 and len(xs) == len(ys)
        assert all(0 <= x <= image["width"] for x in xs) and all(0 <= y <= image["height"] for y in ys)
        assert annotation["area"] > 0


def test_a_smart_keypoint_through_interactive_annotating_returns_polygons(project):
    api, _, ml_backend, sizes = project
    task, size = next((task, size) for task, size in sizes.items() if size == (400, 300))
    click = {
        "id": "e2e-polygon-click",
        "from_name": "click",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
        "original_width": 400,
        "original_height": 300,
        "image_rotation": 0,
        "is_positive": True,
        "value": {"x": 50.0, "y": 55.0, "width": 0.6, "keypointlabels": ["Car"]},
    }
    answer = api.call(
        "POST", f"/api/ml/{ml_backend}/interactive-annotating", json={"task": task, "context": {"result": [click]}}
    )
    assert "errors" not in answer, answer
    regions = answer["data"]["result"]
    assert_polygons(regions, size)
    assert {region["value"]["polygonlabels"][0] for region in regions} == {"Car"}
