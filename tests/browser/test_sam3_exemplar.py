"""SAM 3's exemplar box in a real browser, in the real Label Studio 1.23.2 labelling page (docs/models.md,
"Exemplars"): an annotator draws one box with the exemplar control's smart tool, and every object SAM 3 finds like it
shows as a mask suggestion with the box's label; accepted and submitted, they are what Label Studio stores.

The backend is gunicorn with the reduced SAM 3 (random weights) as both `SAM_MODEL_TYPE` and `DETECTOR`, thresholds at
0 so that it answers its best instances: what is checked is the flow on screen, not what the model sees. The
screenshot of the suggestions is docs/annotator-exemplar.png (`make screenshots`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.browser.labeling import LabelingPage, create_project
from tests.browser.test_smart_tools import assert_brush_of_image_size, assert_mask, stored_results
from tests.detector_weights import write_sam3
from tests.e2e.conftest import backend_environment, sam3_environment
from tests.e2e.label_studio import LabelStudioApi
from tests.load_harness import GunicornServer

pytestmark = pytest.mark.browser

BRUSH, EXEMPLARS = 0, 1  # the label controls, in the order the page shows their label chips
LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Car" background="#FF0000"/>
    <Label value="Wheel" background="#0000FF"/>
  </BrushLabels>
  <RectangleLabels name="find" toName="image" smart="true" exemplar="true">
    <Label value="Car" background="#FF0000" showInline="true"/>
    <Label value="Wheel" background="#0000FF" showInline="true"/>
  </RectangleLabels>
</View>"""


@pytest.fixture(scope="module")
def sam3_backend(
    label_studio, personal_access_token, grounding_dino_files, redis_server, tmp_path_factory
) -> Iterator[GunicornServer]:
    folder = write_sam3(tmp_path_factory.mktemp("sam3-browser") / "sam3")
    model_dir = tmp_path_factory.mktemp("sam3-browser-backend")
    environment = sam3_environment(
        backend_environment(
            label_studio.url, personal_access_token, folder, grounding_dino_files, redis_server.url, model_dir
        ),
        folder,
        3,
    )
    server = GunicornServer(environment, model_dir / "gunicorn.log", workers=1)
    server.start()
    yield server
    server.stop()


def test_an_exemplar_box_shows_every_object_like_it_as_suggestions_with_its_label(
    page, label_studio, personal_access_token, sam3_backend, tmp_path, readme_screenshot: Callable[..., Path]
):
    api = LabelStudioApi(label_studio.url, personal_access_token)
    project = create_project(api, sam3_backend.url, "SAM 3 exemplar", label_config=LABEL_CONFIG)
    labeling = LabelingPage(page, label_studio.url, project, tmp_path)
    labeling.open()
    labeling.turn_on_auto_annotation()
    labeling.choose_label(EXEMPLARS, "Car")  # picks the control's plain rectangle tool: the smart one after it
    labeling.choose_smart_tool("rectangle-tool")

    box = labeling.drag_on_image((0.3, 0.25), (0.7, 0.55))

    assert [(region["from_name"], region["value"]["rectanglelabels"]) for region in box.sent] == [("find", ["Car"])]
    assert box.answered, "SAM 3 answered no object like the box"
    for mask in box.answered:
        assert_mask(mask, "Car")
        assert mask["from_name"] == "tag"
    labeling.wait_for_suggestions([mask["id"] for mask in box.answered])
    readme_screenshot(labeling, "annotator-exemplar")

    labeling.accept_suggestions()
    assert labeling.region_rows(len(box.answered)) == [("brushregion", "Car")] * len(box.answered)
    labeling.submit()
    stored = stored_results(project)
    assert len(stored) == len(box.answered)
    for region in stored:
        assert_mask(region, "Car")
        assert_brush_of_image_size(region, project)
