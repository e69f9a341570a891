"""Smart-region context → SAM prompts: points, boxes, remembered boxes and mask refinement."""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest

from backend.cache.sessions import SessionStore
from backend.cache.store import MemoryStore
from backend.errors import PromptError
from backend.models.base import MaskPrediction
from backend.prompts.interactive import InteractivePrompter, PixelPrompts, read_context
from tests.assets import recorded

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


def rectangle(x: float, y: float, w: float, h: float, label: str = "Car", rotation: float = 0) -> dict:
    return {
        "type": "rectanglelabels",
        "from_name": "tag3",
        "to_name": "image",
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]},
    }


def in_pixels(context: object, size: tuple[int, int] = SIZE) -> PixelPrompts:
    return read_context(context, 100).in_pixels(size)


def prompter() -> InteractivePrompter:
    return InteractivePrompter(SessionStore(MemoryStore(1 << 24), "model", 60), "digest", 1)


def fake_predictions(count: int) -> list[MaskPrediction]:
    return [MaskPrediction(np.zeros(SIZE, bool), 0.9, np.full((256, 256), float(i), np.float32)) for i in range(count)]


def test_recorded_keypoints_become_one_object_with_positive_and_negative_points():
    parsed = in_pixels(recorded("04-predict-interactive-keypoints.json")["params"]["context"])
    (obj,) = prompter().prompts(parsed)
    assert obj.label == "Car"
    assert np.allclose(obj.prompt.points, [(512.0, 422.4), (51.2, 38.4)])
    assert obj.prompt.point_labels == [1, 0]
    assert obj.prompt.box is None


def test_missing_is_positive_means_positive_and_labels_may_come_in_value_labels():
    item = keypoint(10, 10, positive=None)
    item["value"] = {"x": 10, "y": 10, "labels": ["Wheel"]}
    parsed = in_pixels({"result": [item]})
    assert parsed.keypoints["Wheel"] == [pytest.approx((102.4, 76.8, 1))]


def test_recorded_rectangle_becomes_a_pixel_box():
    parsed = in_pixels(recorded("05-predict-interactive-rectangle.json")["params"]["context"])
    (obj,) = prompter().prompts(parsed)
    assert obj.prompt.box == pytest.approx((204.8, 230.4, 819.2, 552.96))


WIDE = (100, 200)  # height, width: a percent of the width is twice the pixels of a percent of the height


def test_a_rectangle_turned_90_degrees_on_a_wide_image_is_bounded_in_pixels():
    # 40%, 10% of 200x100 is (80, 10); 25% wide is 50 px, 30% high is 30 px. Turned 90 degrees clockwise about its
    # top-left corner, the 50 px side points down and the 30 px side to the left of that corner.
    ((box,),) = in_pixels({"result": [rectangle(40, 10, 25, 30, rotation=90)]}, WIDE).rectangles.values()
    assert box == pytest.approx((80 - 30, 10, 80, 10 + 50))


def test_a_rectangle_turned_30_degrees_on_a_wide_image_is_bounded_in_pixels():
    # Complex numbers, y pointing down: turning clockwise by a is multiplying by e^(ia).
    corner, turn = complex(0.30 * 200, 0.20 * 100), cmath.exp(1j * math.radians(30))
    corners = [corner + offset * turn for offset in (0, 50, 30j, 50 + 30j)]
    expected = (
        min(c.real for c in corners),
        min(c.imag for c in corners),
        max(c.real for c in corners),
        max(c.imag for c in corners),
    )
    ((box,),) = in_pixels({"result": [rectangle(30, 20, 25, 30, rotation=30)]}, WIDE).rectangles.values()
    assert box == pytest.approx(expected)


def test_a_turned_rectangle_reaching_out_of_the_image_is_refused_once_its_size_is_known():
    prompts = read_context({"result": [rectangle(40, 10, 25, 30, rotation=180)]}, 100)
    with pytest.raises(PromptError) as error:
        prompts.in_pixels(WIDE)
    assert error.value.status == 422 and "outside" in str(error.value)


def test_clicks_sent_from_a_rotated_view_are_in_percent_of_the_unrotated_image():
    # Label Studio 1.23 turns only its canvas: the clicks and original_width/height stay those of the image as
    # decoded (see read_context), so the recorded clicks land on the same pixels whatever image_rotation says.
    context = recorded("04-predict-interactive-keypoints.json")["params"]["context"]
    for item in context["result"]:
        item["image_rotation"] = 90
    (obj,) = prompter().prompts(in_pixels(context))
    assert np.allclose(obj.prompt.points, [(512.0, 422.4), (51.2, 38.4)])


def test_clicks_inside_a_remembered_box_are_combined_with_it():
    session = prompter()
    boxes = session.prompts(in_pixels({"result": [rectangle(10, 10, 50, 50)]}))
    session.remember(boxes, fake_predictions(1))
    (inside,) = session.prompts(in_pixels({"result": [keypoint(30, 30)]}))
    assert inside.prompt.box == pytest.approx((102.4, 76.8, 614.4, 460.8))
    (outside,) = session.prompts(in_pixels({"result": [keypoint(90, 90)]}))
    assert outside.prompt.box is None


def test_adding_points_feeds_back_the_previous_mask_logits_and_a_new_object_does_not():
    session = prompter()
    first = session.prompts(in_pixels({"result": [keypoint(30, 30)]}))
    assert first[0].prompt.mask_logits is None
    session.remember(first, fake_predictions(1))
    more = session.prompts(in_pixels({"result": [keypoint(30, 30), keypoint(40, 40, False)]}))
    assert more[0].prompt.mask_logits is not None
    other = session.prompts(in_pixels({"result": [keypoint(70, 70)]}))
    assert other[0].prompt.mask_logits is None


def test_each_label_is_its_own_object():
    parsed = in_pixels({"result": [keypoint(10, 10), keypoint(60, 60, label="Wheel")]})
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
        (dict(keypoint(10, 10), image_rotation="90deg"), 400),
        (rectangle(90, 10, 20, 5), 422),
        (rectangle(10, 10, 5, 5, rotation="a"), 400),
    ],
)
def test_bad_regions_are_refused_with_a_status(item, status):
    with pytest.raises(PromptError) as error:
        read_context({"result": [item]}, 100)
    assert error.value.status == status


def test_too_many_regions_are_refused():
    with pytest.raises(PromptError) as error:
        read_context({"result": [keypoint(1, 1)] * 11}, 10)
    assert error.value.status == 413


def test_rectangles_of_the_exemplar_control_are_exemplars_and_the_others_boxes():
    negative = {**rectangle(50, 50, 10, 10, label="Car"), "from_name": "find", "is_positive": False}
    context = {"result": [rectangle(10, 10, 20, 20), {**rectangle(0, 0, 50, 25), "from_name": "find"}, negative]}
    parsed = read_context(context, 100, exemplar_control="find").in_pixels(SIZE)
    assert list(parsed.rectangles) == list(parsed.exemplars) == ["Car"]
    assert np.allclose(parsed.rectangles["Car"], [(102.4, 76.8, 307.2, 230.4)])
    boxes, positive = zip(*parsed.exemplars["Car"], strict=True)
    assert np.allclose(boxes, [(0, 0, 512, 192), (512, 384, 614.4, 460.8)]) and positive == (True, False)
    # Without an exemplar control in the label config every rectangle is a box prompt.
    assert read_context(context, 100).exemplars == {}
