"""Smart-region context → SAM prompts: points, boxes, remembered boxes and mask refinement."""

from __future__ import annotations

import numpy as np
import pytest

from backend.cache.sessions import SessionStore
from backend.cache.store import MemoryStore
from backend.errors import PromptError
from backend.models.base import MaskPrediction
from backend.prompts.interactive import InteractivePrompter, parse_context
from tests.conftest import recorded

SIZE = (768, 1024)  # height, width


def keypoint(x: float, y: float, positive: bool | None = True, label: str = "Car") -> dict:
    item = {
        "type": "keypointlabels",
        "from_name": "tag2",
        "to_name": "image",
        "value": {"x": x, "y": y, "width": 0.6, "keypointlabels": [label]},
    }
    if positive is not None:
        item["is_positive"] = positive
    return item


def rectangle(x: float, y: float, w: float, h: float, label: str = "Car") -> dict:
    return {
        "type": "rectanglelabels",
        "from_name": "tag3",
        "to_name": "image",
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0, "rectanglelabels": [label]},
    }


def prompter() -> InteractivePrompter:
    return InteractivePrompter(SessionStore(MemoryStore(1 << 24), "model", 60), "digest", 1)


def fake_predictions(count: int) -> list[MaskPrediction]:
    return [MaskPrediction(np.zeros(SIZE, bool), 0.9, np.full((256, 256), float(i), np.float32)) for i in range(count)]


def test_recorded_keypoints_become_one_object_with_positive_and_negative_points():
    parsed = parse_context(recorded("04-predict-interactive-keypoints.json")["params"]["context"], SIZE, 100)
    (obj,) = prompter().prompts(parsed)
    assert obj.label == "Car"
    assert np.allclose(obj.prompt.points, [(512.0, 422.4), (51.2, 38.4)])
    assert obj.prompt.point_labels == [1, 0]
    assert obj.prompt.box is None


def test_missing_is_positive_means_positive_and_labels_may_come_in_value_labels():
    item = keypoint(10, 10, positive=None)
    item["value"] = {"x": 10, "y": 10, "labels": ["Wheel"]}
    parsed = parse_context({"result": [item]}, SIZE, 100)
    assert parsed.keypoints["Wheel"] == [pytest.approx((102.4, 76.8, 1))]


def test_recorded_rectangle_becomes_a_pixel_box():
    parsed = parse_context(recorded("05-predict-interactive-rectangle.json")["params"]["context"], SIZE, 100)
    (obj,) = prompter().prompts(parsed)
    assert obj.prompt.box == pytest.approx((204.8, 230.4, 819.2, 552.96))


def test_clicks_inside_a_remembered_box_are_combined_with_it():
    session = prompter()
    boxes = session.prompts(parse_context({"result": [rectangle(10, 10, 50, 50)]}, SIZE, 100))
    session.remember(boxes, fake_predictions(1))
    (inside,) = session.prompts(parse_context({"result": [keypoint(30, 30)]}, SIZE, 100))
    assert inside.prompt.box == pytest.approx((102.4, 76.8, 614.4, 460.8))
    (outside,) = session.prompts(parse_context({"result": [keypoint(90, 90)]}, SIZE, 100))
    assert outside.prompt.box is None


def test_adding_points_feeds_back_the_previous_mask_logits_and_a_new_object_does_not():
    session = prompter()
    first = session.prompts(parse_context({"result": [keypoint(30, 30)]}, SIZE, 100))
    assert first[0].prompt.mask_logits is None
    session.remember(first, fake_predictions(1))
    more = session.prompts(parse_context({"result": [keypoint(30, 30), keypoint(40, 40, False)]}, SIZE, 100))
    assert more[0].prompt.mask_logits is not None
    other = session.prompts(parse_context({"result": [keypoint(70, 70)]}, SIZE, 100))
    assert other[0].prompt.mask_logits is None


def test_each_label_is_its_own_object():
    parsed = parse_context({"result": [keypoint(10, 10), keypoint(60, 60, label="Wheel")]}, SIZE, 100)
    assert sorted(obj.label for obj in prompter().prompts(parsed)) == ["Car", "Wheel"]


@pytest.mark.parametrize(
    "item, status",
    [
        (keypoint(150, 10), 422),
        (keypoint(-5, 10), 422),
        ({"type": "keypointlabels", "value": {"x": "a", "y": 1, "keypointlabels": ["Car"]}}, 400),
        ({"type": "keypointlabels", "value": {"x": float("nan"), "y": 1, "keypointlabels": ["Car"]}}, 400),
        ({"type": "keypointlabels", "value": {"x": 1, "y": 1}}, 400),
        (rectangle(10, 10, 0, 5), 422),
        ({"type": "polygonlabels", "value": {}}, 422),
        ({"type": "keypointlabels"}, 400),
    ],
)
def test_bad_regions_are_refused_with_a_status(item, status):
    with pytest.raises(PromptError) as error:
        parse_context({"result": [item]}, SIZE, 100)
    assert error.value.status == status


def test_too_many_regions_are_refused():
    with pytest.raises(PromptError) as error:
        parse_context({"result": [keypoint(1, 1)] * 11}, SIZE, 10)
    assert error.value.status == 413
