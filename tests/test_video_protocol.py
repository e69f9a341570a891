"""Label Studio's video JSON (backend/protocol/video.py), replayed from what Label Studio 1.23.2 really sent and stored
for a VideoRectangle project (tests/fixtures/ls-protocol/20-video-*.json, tests/e2e/record_video_protocol.py)."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import replace
from typing import Any

import pytest

from backend.errors import BadRequest, VideoRegionError
from backend.protocol.video import (
    VideoBox,
    VideoObject,
    frame_index,
    frame_number,
    video_objects,
    video_rectangle_result,
)
from tests.assets import PROTOCOL_DIR, recorded


def whole(name: str) -> dict[str, Any]:
    """A recorded file with what the backend answered, or the state Label Studio stored (20-video-99-stored.json)."""
    return json.loads((PROTOCOL_DIR / name).read_text())


def annotated_result() -> list[dict[str, Any]]:
    """The result of the annotation Label Studio sent with ANNOTATION_CREATED."""
    return recorded("20-video-webhook-annotation-created.json")["annotation"]["result"]


def test_the_recorded_annotation_reads_as_one_object_with_its_keyframes():
    (car,) = video_objects(annotated_result())
    assert (car.region_id, car.from_name, car.to_name, car.labels) == ("car0000001", "box", "video", ("Car",))
    assert [keyframe.frame for keyframe in car.keyframes] == [1, 20, 40]
    assert [keyframe.enabled for keyframe in car.keyframes] == [True, True, False]
    first = car.keyframes[0]
    assert (first.x, first.y, first.width, first.height, first.rotation, first.time) == (
        6.25,
        25.0,
        25.0,
        25.0,
        0,
        0.04,
    )
    assert first.pixel_box((120, 160)) == (10.0, 30.0, 50.0, 60.0)  # the block's box on 0-based frame 0


def test_a_region_drawn_in_the_editor_reads_with_its_lifespan_ended():
    """Boxed on frame 1, moved on frame 20, Toggle Keypoint and Toggle Interpolation on frame 40, in the editor."""
    result = recorded("20-video-webhook-annotation-created-in-editor.json")["annotation"]["result"]
    (car,) = video_objects(result)
    assert (car.from_name, car.to_name, car.labels) == ("box", "video", ("Car",))
    assert [(keyframe.frame, keyframe.enabled, keyframe.time) for keyframe in car.keyframes] == [
        (1, True, 0.04),
        (20, True, 0.8),
        (40, False, 1.6),
    ]
    for keyframe, index in zip(car.keyframes[:2], (0, 19), strict=True):  # where the block is, within a pixel
        expected = (10.0 + 2 * index, 30.0, 50.0 + 2 * index, 60.0)
        assert keyframe.pixel_box((120, 160)) == pytest.approx(expected, abs=1)
    assert car.shown_at(30) == replace(car.keyframes[1], frame=30, time=None)  # frames 20 and 40 are one box
    assert car.shown_at(41) is None


def test_the_interactive_context_reads_like_the_annotation():
    sent = recorded("20-video-predict-interactive.json")
    assert video_objects(sent["params"]["context"]["result"]) == video_objects(annotated_result())


def test_a_separate_labels_result_under_the_same_id_gives_the_region_its_labels():
    region = copy.deepcopy(annotated_result()[0])
    del region["value"]["labels"]
    labels = {"id": region["id"], "from_name": "videoLabels", "to_name": "video", "type": "labels"}
    (car,) = video_objects([region, labels | {"value": {"labels": ["Person"]}}])
    assert car.labels == ("Person",)


def test_only_the_named_video_is_read():
    assert video_objects(annotated_result(), to_name="other") == []
    assert len(video_objects(annotated_result(), to_name="video")) == 1


def test_the_tracked_result_is_what_label_studio_stored_and_answers():
    """The recorder answered /predict with video_rectangle_result; Label Studio stored it unchanged."""
    stored = whole("20-video-99-stored.json")
    answered = whole("20-video-predict-batch.json")["backend_answered"]["json"]["results"][0]["result"]
    from_backend = [prediction for prediction in stored["predictions"] if prediction["model_version"] != "bare"]
    assert [prediction["result"] for prediction in from_backend] == [answered, answered]
    (car,) = video_objects(annotated_result())
    boxes = [VideoBox.from_pixels(i + 1, (10.0 + 2 * i, 30.0, 50.0 + 2 * i, 60.0), (120, 160)) for i in range(40)]
    built = video_rectangle_result(car, boxes, frames_count=50, duration=2.0, framerate=25, score=0.9)
    assert [built] == answered
    assert set(built) == {"id", "from_name", "to_name", "type", "value", "score"}
    assert set(built["value"]) == {"framesCount", "duration", "sequence", "labels"}
    assert set(built["value"]["sequence"][0]) == {"frame", "enabled", "rotation", "x", "y", "width", "height", "time"}


def test_the_editor_shows_a_tracked_result_with_or_without_frames_count():
    """The stored prediction, and the same without framesCount, duration and time, in Label Studio's editor."""
    shown = whole("20-video-99-stored.json")["predictions_in_editor"]["shown"]
    x_on_frame = {"1": 6.25, "10": 17.5, "39": 53.75, "40": 55, "41": None, "50": None}  # lost after frame 40
    assert shown == [{"regions": 1, "type": "videorectangleregion", "label": "Car", "x_on_frame": x_on_frame}] * 2


def test_the_annotators_keyframes_are_kept_and_a_lost_object_is_disabled_until_it_returns():
    drawn = (VideoBox(3, 1.0, 2.0, 3.0, 4.0, enabled=True, rotation=5.0, time=0.123),)
    car = VideoObject("r1", "box", "video", ("Car",), drawn)
    tracked = [VideoBox(frame, 10.0, 10.0, 5.0, 5.0, enabled=False) for frame in (1, 2, 3, 4, 7, 8)]
    sequence = video_rectangle_result(car, tracked, frames_count=10, duration=0.4, framerate=25)["value"]["sequence"]
    assert [(item["frame"], item["enabled"]) for item in sequence] == [
        (1, True),
        (2, True),
        (3, True),  # the annotator's, exactly as drawn
        (4, False),  # lost on frames 5 and 6: hidden after frame 4
        (7, True),
        (8, False),  # lost from frame 9 to the end: not held to the video's end
    ]
    assert sequence[2] == {
        "frame": 3,
        "enabled": True,
        "rotation": 5.0,
        "x": 1.0,
        "y": 2.0,
        "width": 3.0,
        "height": 4.0,
        "time": 0.123,
    }
    assert sequence[0]["time"] == 1 / 25
    object_to_the_end = video_rectangle_result(
        car, [VideoBox(10, 1, 1, 1, 1, True)], frames_count=10, duration=0.4, framerate=25
    )
    assert object_to_the_end["value"]["sequence"][-1]["enabled"] is True
    assert "score" not in object_to_the_end


def test_a_tracked_box_outside_the_video_is_a_mistake():
    car = VideoObject("r1", "box", "video", (), ())
    with pytest.raises(ValueError, match="outside frames 1..10"):
        video_rectangle_result(car, [VideoBox(11, 1, 1, 1, 1, True)], frames_count=10, duration=0.4, framerate=25)


def test_the_editor_shows_interpolated_boxes_within_the_lifespan():
    (car,) = video_objects(annotated_result())
    assert car.shown_at(1) == car.keyframes[0]
    halfway = car.shown_at(30)  # between frame 20 (x 30 %) and frame 40 (x 55 %)
    assert halfway is not None and halfway.x == pytest.approx(42.5) and halfway.enabled
    assert car.shown_at(40) == car.keyframes[2]  # a disabled keyframe shows on its own frame...
    assert car.shown_at(41) is None  # ...and hides the object after it
    turned = VideoObject(
        "r", "box", "video", (), (VideoBox(1, 0, 0, 1, 1, True, -170), VideoBox(3, 0, 0, 1, 1, True, 170))
    )
    shown = turned.shown_at(2)
    assert shown is not None and shown.rotation == pytest.approx(180)  # the shorter way round


def test_frames_count_from_one():
    assert frame_index(1) == 0 and frame_number(0) == 1


def broken(path: list[str | int], value: Any) -> list[dict[str, Any]]:
    results = copy.deepcopy(annotated_result())
    target: Any = results[0]
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return results


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (["value"], [], "result[0].value must be an object"),
        (["value", "sequence"], [], "result[0].value.sequence must be a non-empty list"),
        (["value", "sequence"], KeyError, "result[0].value.sequence must be a non-empty list"),
        (["value", "sequence", 1, "frame"], 0, "result[0].value.sequence[1].frame"),
        (["value", "sequence", 1, "frame"], 2.5, "result[0].value.sequence[1].frame"),
        (["value", "sequence", 1, "x"], "12", "result[0].value.sequence[1].x must be a finite number"),
        (["value", "sequence", 1, "width"], -1, "result[0].value.sequence[1].width"),
        (["value", "sequence", 2, "enabled"], "no", "result[0].value.sequence[2].enabled must be true or false"),
        (["value", "sequence", 0], 7, "result[0].value.sequence[0] must be an object"),
        (["value", "labels"], "Car", "result[0].value.labels must be a list"),
        (["id"], None, "result[0].id must be a non-empty string"),
    ],
)
def test_a_malformed_region_is_a_bad_request_naming_the_field(path, value, named):
    with pytest.raises(BadRequest, match=named.replace("[", r"\[").replace("]", r"\]")) as raised:
        video_objects(broken(path, value))
    assert isinstance(raised.value, VideoRegionError) and raised.value.status == 422


def test_a_missing_enabled_reads_as_label_studio_reads_it():
    (car,) = video_objects(broken(["value", "sequence", 0, "enabled"], KeyError))
    assert car.keyframes[0].enabled is False


def test_not_a_list_of_results_is_a_bad_request():
    with pytest.raises(BadRequest, match="result must be a list"):
        video_objects("videorectangle")  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match=r"result\[0\] must be an object"):
        video_objects([["videorectangle"]])  # type: ignore[list-item]


def test_more_keyframes_or_objects_than_the_bound_are_refused():
    results = annotated_result()
    with pytest.raises(BadRequest, match="has 3 keyframes; at most 2"):
        video_objects(results, max_keyframes=2)
    with pytest.raises(BadRequest, match="more than 1 VideoRectangle regions"):
        video_objects(results * 2, max_objects=1)
    assert len(video_objects(results * 2, max_objects=2)) == 2


# Thinning: the tracked boxes the editor's interpolation reproduces are left out.


def jittery_track(frames: range, seed: int) -> list[VideoBox]:
    """A box drifting right with noise, as a tracker's boxes are."""
    rng = random.Random(seed)
    return [
        VideoBox(frame, 5.0 + 0.7 * frame + rng.uniform(-0.3, 0.3), 20.0 + rng.uniform(-0.3, 0.3), 20.0, 15.0, True)
        for frame in frames
    ]


def test_a_straight_track_thins_to_its_ends():
    car = VideoObject("r1", "box", "video", ("Car",), (VideoBox(1, 5.7, 20.0, 20.0, 15.0, True),))
    straight = [VideoBox(frame, 5.0 + 0.7 * frame, 20.0, 20.0, 15.0, True) for frame in range(2, 51)]
    result = video_rectangle_result(car, straight, frames_count=50, duration=2.0, framerate=25, tolerance=0.1)
    assert [item["frame"] for item in result["value"]["sequence"]] == [1, 50]


@pytest.mark.parametrize("seed", range(5))
def test_the_editor_shows_a_thinned_track_within_the_tolerance_of_every_tracked_box(seed):
    drawn = (VideoBox(10, 12.0, 20.0, 20.0, 15.0, True), VideoBox(60, 47.0, 20.0, 20.0, 15.0, False))
    car = VideoObject("r1", "box", "video", ("Car",), drawn)
    # Tracked on 1-80 but lost on 30-34, so that lifespans end and start again.
    tracked = [box for box in jittery_track(range(1, 81), seed) if not 30 <= box.frame <= 34]
    dense = video_rectangle_result(car, tracked, frames_count=80, duration=3.2, framerate=25)
    thinned = video_rectangle_result(car, tracked, frames_count=80, duration=3.2, framerate=25, tolerance=0.5)
    dense_shown, thinned_shown = (video_objects([result])[0] for result in (dense, thinned))
    assert len(thinned["value"]["sequence"]) < len(dense["value"]["sequence"]) / 2
    for frame in range(1, 81):
        want, got = dense_shown.shown_at(frame), thinned_shown.shown_at(frame)
        assert (want is None) == (got is None), frame  # the same lifespans
        if want is not None and got is not None:
            for side in ("x", "y", "width", "height"):
                assert abs(getattr(want, side) - getattr(got, side)) <= 0.5 + 1e-9, (frame, side)
    kept = {item["frame"]: item for item in thinned["value"]["sequence"]}
    for keyframe in drawn:  # the annotator's, as drawn
        assert kept[keyframe.frame] == keyframe.as_json(25)
    assert kept[29]["enabled"] is False and kept[35]["enabled"] is True  # lost and found again
