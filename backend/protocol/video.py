"""Label Studio's JSON for video object tracking: the VideoRectangle regions an annotator drew, read from a result
list, and one tracked object written back as the single `videorectangle` result Label Studio 1.23.2 stores and shows.

Label Studio's meaning, from its editor (docs/video.md, "What Label Studio 1.23.2 sends and shows for video"): a
region is a `sequence` of keyframes; frames are numbered from 1; between two keyframes the box is interpolated
linearly, whatever their `enabled`; a keyframe with `enabled: false` is shown on its own frame and hides the object
after it until the next keyframe; the last keyframe, if enabled, is held to the end of the video. x, y, width and
height are percent of the frame's width and height, (x, y) the top-left corner the box is rotated about (degrees,
clockwise on screen). `time` is the keyframe's frame number divided by the Video tag's frame rate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from backend.errors import VideoRegionError

RESULT_TYPE = "videorectangle"
LABELS_TYPE = "labels"  # an external <Labels> result Label Studio may send beside the region, under the same id
FIRST_FRAME = 1  # Label Studio's number of a video's first frame

# Bounds on what one result list may hold, so that a hostile or broken request cannot fill memory: an hour of video at
# 30 frames per second with a keyframe on every frame, and more objects than an annotator tracks in one task.
MAX_KEYFRAMES = 108_000  # per object
MAX_OBJECTS = 1_000  # per result list


def frame_index(frame: int) -> int:
    """The 0-based index of Label Studio's frame number (the decoder's numbering)."""
    return frame - FIRST_FRAME


def frame_number(index: int) -> int:
    """Label Studio's frame number of a 0-based frame index."""
    return index + FIRST_FRAME


@dataclass(frozen=True)
class VideoBox:
    """One keyframe of one object, in Label Studio's units.

    `frame` is Label Studio's frame number, 1-based. x, y, width and height are percent of the frame's width and
    height; (x, y) is the top-left corner, the centre of `rotation` (degrees, clockwise on screen). `enabled: False`
    ends the object's lifespan: the box is shown on this frame and hidden after it until the next keyframe. `time` is
    `frame / framerate` in seconds, as the editor writes it (None where the sender gave none)."""

    frame: int
    x: float
    y: float
    width: float
    height: float
    enabled: bool
    rotation: float = 0.0
    time: float | None = None

    def pixel_box(self, frame_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels of a frame of `frame_size` (height, width): the axis-aligned box around the
        rotated rectangle (the rectangle itself when it is not rotated)."""
        height, width = frame_size
        left, top = self.x * width / 100, self.y * height / 100
        right, bottom = self.width * width / 100, self.height * height / 100  # the sides, before rotation
        cos, sin = math.cos(math.radians(self.rotation)), math.sin(math.radians(self.rotation))
        corners = [(0.0, 0.0), (right, 0.0), (right, bottom), (0.0, bottom)]
        xs = [left + dx * cos - dy * sin for dx, dy in corners]
        ys = [top + dx * sin + dy * cos for dx, dy in corners]
        return min(xs), min(ys), max(xs), max(ys)

    @classmethod
    def from_pixels(
        cls, frame: int, box: tuple[float, float, float, float], frame_size: tuple[int, int], *, enabled: bool = True
    ) -> VideoBox:
        """An unrotated keyframe from a pixel box (x0, y0, x1, y1) on a frame of `frame_size` (height, width)."""
        height, width = frame_size
        x0, y0, x1, y1 = box
        return cls(
            frame=frame,
            x=100.0 * x0 / width,
            y=100.0 * y0 / height,
            width=100.0 * (x1 - x0) / width,
            height=100.0 * (y1 - y0) / height,
            enabled=enabled,
        )

    def as_json(self, framerate: float) -> dict[str, Any]:
        """The sequence item Label Studio stores, with `time` filled in from the frame rate where it is None."""
        time = self.time if self.time is not None else self.frame / framerate
        return {
            "frame": self.frame,
            "enabled": self.enabled,
            "rotation": self.rotation,
            "x": self.x,
            "y": self.y,
            "width": self.width,
            "height": self.height,
            "time": time,
        }


@dataclass(frozen=True)
class VideoObject:
    """One VideoRectangle region an annotator drew: its keyframes sorted by frame, one per frame."""

    region_id: str
    from_name: str
    to_name: str
    labels: tuple[str, ...]
    keyframes: tuple[VideoBox, ...]

    def shown_at(self, frame: int) -> VideoBox | None:
        """The box Label Studio's editor shows on `frame`, None where it shows none (VideoRectangleRegion.getShape
        and VideoRegion.isInLifespan): interpolated between the keyframes around it, hidden after a disabled
        keyframe and before the first one."""
        previous = next_one = None
        for keyframe in self.keyframes:
            if keyframe.frame == frame:
                return keyframe
            if keyframe.frame > frame:
                next_one = keyframe
                break
            previous = keyframe
        if previous is None or not previous.enabled:
            return None
        if next_one is None:
            return replace(previous, frame=frame, time=None)
        share = (frame - previous.frame) / (next_one.frame - previous.frame)

        def between(start: float, end: float) -> float:
            return start + (end - start) * share

        return VideoBox(
            frame=frame,
            x=between(previous.x, next_one.x),
            y=between(previous.y, next_one.y),
            width=between(previous.width, next_one.width),
            height=between(previous.height, next_one.height),
            enabled=True,
            # The shorter way round, as the editor turns a box (utils/props.ts interpolateProp).
            rotation=_normal_angle(previous.rotation + _normal_angle(next_one.rotation - previous.rotation) * share),
        )


def _thinned(sequence: list[VideoBox], drawn: Iterable[int], tolerance: float) -> list[VideoBox]:
    """`sequence` without the tracked boxes that linear interpolation between their kept neighbours reproduces
    within `tolerance`. Kept whatever they hold: the drawn keyframes, each lifespan's first and last box (a disabled
    box and the one after it), and the sequence's ends; between two such anchors the frames run without a gap, and
    the Ramer-Douglas-Peucker rule keeps the box furthest from the interpolation until every box is within reach."""
    pinned = set(drawn)
    anchors = [
        position
        for position, box in enumerate(sequence)
        if position in (0, len(sequence) - 1)
        or box.frame in pinned
        or not box.enabled
        or not sequence[position - 1].enabled
    ]
    keep = set(anchors)
    for start, end in itertools.pairwise(anchors):
        spans = [(start, end)]
        while spans:
            first, last = spans.pop()
            worst, distance = _furthest(sequence, first, last)
            if distance > tolerance:
                keep.add(worst)
                spans += [(first, worst), (worst, last)]
    return [box for position, box in enumerate(sequence) if position in keep]


def _furthest(sequence: list[VideoBox], first: int, last: int) -> tuple[int, float]:
    """The box between `first` and `last` furthest (in its largest coordinate) from their interpolation, and how far."""
    worst, distance = first, 0.0
    start, end = sequence[first], sequence[last]
    for position in range(first + 1, last):
        box = sequence[position]
        share = (box.frame - start.frame) / (end.frame - start.frame)
        off = max(
            abs(getattr(box, side) - (getattr(start, side) + (getattr(end, side) - getattr(start, side)) * share))
            for side in ("x", "y", "width", "height")
        )
        if off > distance:
            worst, distance = position, off
    return worst, distance


def _normal_angle(degrees: float) -> float:
    """The same angle in (-180, 180]."""
    return 180.0 - (180.0 - degrees) % 360.0


def _number(item: Mapping[str, Any], key: str, where: str) -> float:
    value = item.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise VideoRegionError(f"{where}.{key} must be a finite number, got {value!r}")
    return float(value)


def _keyframe(item: object, where: str) -> VideoBox:
    if not isinstance(item, Mapping):
        raise VideoRegionError(f"{where} must be an object with frame, x, y, width, height and enabled")
    frame = item.get("frame")
    if isinstance(frame, bool) or not isinstance(frame, int) or frame < FIRST_FRAME:
        raise VideoRegionError(f"{where}.frame must be a whole frame number, 1 or more (frames count from 1)")
    # Label Studio's editor reads a missing `enabled` as false: the box is hidden after its own frame.
    enabled = item.get("enabled", False)
    if not isinstance(enabled, bool):
        raise VideoRegionError(f"{where}.enabled must be true or false, got {enabled!r}")
    width, height = _number(item, "width", where), _number(item, "height", where)
    if width < 0 or height < 0:
        raise VideoRegionError(f"{where}.width and .height must be 0 or more (percent of the frame)")
    time = item.get("time")
    return VideoBox(
        frame=frame,
        x=_number(item, "x", where),
        y=_number(item, "y", where),
        width=width,
        height=height,
        enabled=enabled,
        rotation=_number(item, "rotation", where) if item.get("rotation") is not None else 0.0,
        time=_number(item, "time", where) if time is not None else None,
    )


def _labels(value: Mapping[str, Any], where: str) -> tuple[str, ...]:
    labels = value.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise VideoRegionError(f"{where}.value.labels must be a list of label names")
    return tuple(labels)


def _name(result: Mapping[str, Any], key: str, where: str) -> str:
    name = result.get(key)
    if not isinstance(name, str) or not name:
        raise VideoRegionError(f"{where}.{key} must be a non-empty string")
    return name


def _video_object(result: Mapping[str, Any], where: str, max_keyframes: int) -> VideoObject:
    region_id, from_name, to_name = (_name(result, key, where) for key in ("id", "from_name", "to_name"))
    value = result.get("value")
    if not isinstance(value, Mapping):
        raise VideoRegionError(f"{where}.value must be an object with a 'sequence' of keyframes")
    sequence = value.get("sequence")
    if not isinstance(sequence, list) or not sequence:
        raise VideoRegionError(f"{where}.value.sequence must be a non-empty list of keyframes")
    if len(sequence) > max_keyframes:
        raise VideoRegionError(
            f"{where}.value.sequence has {len(sequence)} keyframes; at most {max_keyframes} are taken"
        )
    by_frame: dict[int, VideoBox] = {}
    for position, item in enumerate(sequence):
        keyframe = _keyframe(item, f"{where}.value.sequence[{position}]")
        by_frame[keyframe.frame] = keyframe  # the editor keeps one keyframe a frame; the last one sent wins
    keyframes = tuple(by_frame[frame] for frame in sorted(by_frame))
    return VideoObject(region_id, from_name, to_name, _labels(value, where), keyframes)


def video_objects(
    results: Sequence[Mapping[str, Any]],
    *,
    to_name: str | None = None,
    max_objects: int = MAX_OBJECTS,
    max_keyframes: int = MAX_KEYFRAMES,
) -> list[VideoObject]:
    """Every VideoRectangle region in an annotation's, a draft's or a context's result list, as Label Studio sends
    it, in the order sent; only those on the video `to_name` when it is given.

    The editor sends one `videorectangle` result holding its labels in `value.labels`; a `labels` result under the
    same id and video (as an import or another client may send) gives the region its labels too. Other results are
    passed over. A malformed region raises VideoRegionError naming the field; more than `max_objects` regions, or
    more than `max_keyframes` keyframes in one, are refused rather than read."""
    if not isinstance(results, Sequence) or isinstance(results, str | bytes):
        raise VideoRegionError("result must be a list of Label Studio results")
    objects: list[VideoObject] = []
    labels: dict[tuple[str, str], tuple[str, ...]] = {}  # (id, to_name) -> an external Labels result's labels
    for position, result in enumerate(results):
        where = f"result[{position}]"
        if not isinstance(result, Mapping):
            raise VideoRegionError(f"{where} must be an object")
        if to_name is not None and result.get("to_name") != to_name:
            continue
        if result.get("type") == LABELS_TYPE:
            value = result.get("value")
            if isinstance(value, Mapping):
                labels[(str(result.get("id")), str(result.get("to_name")))] = _labels(value, where)
        elif result.get("type") == RESULT_TYPE:
            if len(objects) == max_objects:
                raise VideoRegionError(f"result has more than {max_objects} VideoRectangle regions; send fewer")
            objects.append(_video_object(result, where, max_keyframes))
    return [
        replace(obj, labels=labels[(obj.region_id, obj.to_name)])
        if not obj.labels and (obj.region_id, obj.to_name) in labels
        else obj
        for obj in objects
    ]


def video_rectangle_result(
    obj: VideoObject,
    boxes: Sequence[VideoBox],
    *,
    frames_count: int,
    duration: float,
    framerate: float,
    score: float | None = None,
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """One prediction result for a tracked object, in the JSON Label Studio 1.23.2 stores and its editor shows.

    `boxes` are the tracker's boxes, one for each frame it found the object on (their `enabled` is set here); a frame
    with neither a box nor a keyframe is one where the object is lost. The annotator's keyframes are kept exactly as
    drawn and win over a tracked box on their frame. A tracked box followed by a lost frame gets `enabled: False`,
    so the editor hides the object over the gap (and after the last box, rather than hold it to the video's end);
    the next box it is found on starts a new lifespan. The region keeps the annotator's id, names and labels.
    `frames_count` and `duration` (seconds) are the video's, as the editor writes them beside the sequence.

    With a `tolerance` (percent of the frame), a tracked box the editor's interpolation between the boxes kept around
    it reproduces within that much (x, y, width and height each) is left out: the editor shows the same track, and
    the annotator corrects a few keyframes instead of one on every frame."""
    if frames_count < FIRST_FRAME or not (duration >= 0 and framerate > 0):
        raise ValueError(f"frames_count {frames_count}, duration {duration}, framerate {framerate}: not a video's")
    drawn = {keyframe.frame: keyframe for keyframe in obj.keyframes}
    tracked = {box.frame: box for box in boxes if box.frame not in drawn}
    if any(not FIRST_FRAME <= frame <= frames_count for frame in tracked):
        raise ValueError(f"a tracked box lies outside frames {FIRST_FRAME}..{frames_count}")
    found = drawn.keys() | tracked.keys()
    sequence = [
        drawn[frame] if frame in drawn else replace(tracked[frame], enabled=frame + 1 in found or frame == frames_count)
        for frame in sorted(found)
    ]
    if tolerance > 0:
        sequence = _thinned(sequence, drawn.keys(), tolerance)
    value: dict[str, Any] = {
        "framesCount": frames_count,
        "duration": duration,
        "sequence": [keyframe.as_json(framerate) for keyframe in sequence],
    }
    if obj.labels:
        value["labels"] = list(obj.labels)
    result: dict[str, Any] = {
        "id": obj.region_id,
        "from_name": obj.from_name,
        "to_name": obj.to_name,
        "type": RESULT_TYPE,
        "value": value,
    }
    if score is not None:
        result["score"] = float(score)
    return result


def video_prediction(tracks: list[dict[str, Any]], model_version: str) -> dict[str, Any]:
    """A video task's prediction: its tracks, the model version, and the least sure track's score."""
    scores = [track["score"] for track in tracks if "score" in track]
    return {"result": tracks, "model_version": model_version, **({"score": min(scores)} if scores else {})}
