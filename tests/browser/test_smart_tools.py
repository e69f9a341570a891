"""The smart tools and pre-annotation in a real browser, in the real Label Studio 1.23.2 labelling page, against
this backend under gunicorn with Redis: what an annotator's clicks, boxes and text become on their screen, and
what Label Studio stores when they submit.

Each test opens a task of its own project with the README's label config, ends with an assertion on what Label
Studio stored (read through its API) and saves a screenshot in its output folder. `make browser` runs them."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.assets import decode_brush
from tests.browser.labeling import BACKEND_WAIT_MS, KEYPOINTS, RECTANGLES, LabelingPage, Project, create_project
from tests.e2e.label_studio import LabelStudioApi
from tests.e2e.test_polygons import LABEL_CONFIG as POLYGON_CONFIG

pytestmark = pytest.mark.browser

LABELS = {"Car", "Wheel"}


@pytest.fixture
def new_task(page, label_studio, personal_access_token, backend, tmp_path) -> Callable[..., LabelingPage]:
    """A new project of one task, connected to the backend, and the labelling page of that task (not yet open);
    `options` are create_project's (another label config, predictions shown on opening)."""
    api = LabelStudioApi(label_studio.url, personal_access_token)

    def create(title: str, **options: Any) -> LabelingPage:
        return LabelingPage(page, label_studio.url, create_project(api, backend.url, title, **options), tmp_path)

    return create


def stored_results(project: Project) -> list[dict]:
    """The results of the task's one annotation, but for the thresholds' `Number`s, which are always stored."""
    (annotation,) = project.annotations()
    return [region for region in annotation["result"] if region["type"] != "number"]


def assert_mask(region: dict, label: str) -> None:
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == [label], region


def assert_brush_of_image_size(region: dict, project: Project) -> None:
    assert (region["original_width"], region["original_height"]) == (project.width, project.height), region
    assert decode_brush(region).shape == (project.height, project.width)


def assert_detections_shown(rows: list[tuple[str, str]]) -> None:
    """Detected objects show as GroundingDINO's box and SAM's mask, each with one of the project's labels."""
    assert {kind for kind, _ in rows} == {"brushregion", "rectangleregion"}, rows
    assert {label for _, label in rows} <= LABELS, rows


def assert_masks_of_the_labels(results: list[dict], project: Project) -> list[dict]:
    """The brush results among `results`, each checked to carry project labels and the image's size."""
    brushes = [region for region in results if region["type"] == "brushlabels"]
    for brush in brushes:
        assert set(brush["value"]["brushlabels"]) <= LABELS and brush["value"]["brushlabels"], brush
        assert_brush_of_image_size(brush, project)
    return brushes


def accept_and_submit_the_mask(labeling: LabelingPage, label: str) -> None:
    """Accepting leaves the mask alone in the region list (the tool's clicks or box were working regions, and
    go); submitting stores it, with the tool's label, at the image's size."""
    labeling.accept_suggestions()
    assert labeling.region_rows(1) == [("brushregion", label)]
    labeling.screenshot("accepted")
    labeling.submit()
    (stored,) = stored_results(labeling.project)
    assert_mask(stored, label)
    assert_brush_of_image_size(stored, labeling.project)


def test_a_smart_click_gives_a_brush_region_that_a_negative_click_replaces(new_task, readme_screenshot):
    labeling = new_task("smart keypoints")
    labeling.open()
    labeling.turn_on_auto_annotation()
    labeling.choose_smart_tool("key-point-tool")

    labeling.choose_label(KEYPOINTS, "Car")
    (mask,) = labeling.click_image(0.5, 0.4).answered
    assert_mask(mask, "Car")
    labeling.wait_for_suggestions([mask["id"]])

    labeling.choose_label(KEYPOINTS, "Car")
    refined = labeling.click_image(0.8, 0.45, negative=True)
    assert [click["is_positive"] for click in refined.sent] == [True, False]  # one object: both clicks together
    (new_mask,) = refined.answered
    assert_mask(new_mask, "Car")
    assert new_mask["id"] != mask["id"]
    labeling.wait_for_suggestions([new_mask["id"]])  # the first mask is gone: replaced, not added to
    readme_screenshot(labeling, "annotator-smart-click")

    accept_and_submit_the_mask(labeling, "Car")


def test_a_smart_rectangle_gives_a_brush_region_with_its_label(new_task):
    labeling = new_task("smart rectangle")
    labeling.open()
    labeling.turn_on_auto_annotation()
    labeling.choose_smart_tool("rectangle-tool")
    labeling.choose_label(RECTANGLES, "Wheel")
    box = labeling.drag_on_image((0.3, 0.25), (0.7, 0.55))
    assert [region["value"]["rectanglelabels"] for region in box.sent] == [["Wheel"]], box.sent
    (mask,) = box.answered
    assert_mask(mask, "Wheel")
    labeling.wait_for_suggestions([mask["id"]])

    accept_and_submit_the_mask(labeling, "Wheel")


def test_a_text_prompt_gives_regions_with_the_project_labels(new_task):
    labeling = new_task("text prompt")
    labeling.open()
    labeling.turn_on_auto_annotation()
    answered = labeling.submit_text_prompt("car, wheel").answered
    regions = [region for region in answered if region["type"] in ("brushlabels", "rectanglelabels")]
    assert any(region["type"] == "brushlabels" for region in regions), answered
    labeling.wait_for_suggestions([region["id"] for region in regions])
    labeling.accept_suggestions()
    assert_detections_shown(labeling.region_rows(len(regions)))
    labeling.screenshot("accepted")
    labeling.submit()

    results = stored_results(labeling.project)
    brushes = assert_masks_of_the_labels(results, labeling.project)
    assert len(brushes) == sum(region["type"] == "brushlabels" for region in regions), results
    prompts = [region["value"]["text"] for region in results if region["type"] == "textarea"]
    assert prompts == [["car, wheel"]], results


def test_opening_a_task_without_a_prediction_shows_the_pre_annotation(
    new_task, console_log, stage_figures, readme_screenshot
):
    labeling = new_task("pre-annotation on open", show_predictions=True)
    opened = time.perf_counter()
    labeling.open(wait_ms=BACKEND_WAIT_MS)
    labeling.wait_for_regions(BACKEND_WAIT_MS)
    shown_s = time.perf_counter() - opened
    stage_figures.append(f"task opened -> pre-annotation shown: {shown_s:.1f} s")
    readme_screenshot(labeling, "annotator-pre-annotation")

    (prediction,) = labeling.project.predictions()
    results = prediction["result"]
    assert_detections_shown(labeling.region_rows(len(results)))
    assert assert_masks_of_the_labels(results, labeling.project)
    assert console_log.errors == []


def test_a_smart_click_in_a_polygon_project_gives_a_polygon_region(new_task):
    labeling = new_task("smart click, polygons", label_config=POLYGON_CONFIG)
    labeling.open()
    labeling.turn_on_auto_annotation()
    labeling.choose_the_one_smart_tool()  # the smart keypoints
    labeling.choose_label(1, "Car")  # the keypoint labels: the second row of chips, below the polygon labels
    answered = labeling.click_image(0.5, 0.4).answered
    assert answered and {region["type"] for region in answered} == {"polygonlabels"}, answered
    labeling.wait_for_suggestions([region["id"] for region in answered])
    labeling.accept_suggestions()
    # Random weights speckle SAM's mask into hundreds of parts, one polygon each: the list shows the first rows.
    labeling.wait_for_regions(30_000)
    assert set(labeling.shown_region_rows()) == {("polygonregion", "Car")}
    labeling.screenshot("accepted")
    labeling.submit()
    stored = stored_results(labeling.project)
    assert len(stored) == len(answered) and {region["type"] for region in stored} == {"polygonlabels"}, stored
    assert all(region["value"]["polygonlabels"] == ["Car"] and region["value"]["closed"] for region in stored)
