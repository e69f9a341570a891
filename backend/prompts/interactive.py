"""Label Studio's smart-tool context → SAM prompts, one per object.

Label Studio 1.23 sends, each time a smart region is drawn, every region of the annotation with the
same type and label: all keypoints of that label (one object, several positive and negative
clicks) or all rectangles of that label (one object each). The last rectangles of a task and label
are remembered so that later clicks inside one of them refine that box's object, and the previous
mask's logits are fed back while points are only being added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from backend.cache.sessions import Box, Point, Session, SessionStore
from backend.errors import PromptError
from backend.models.base import MaskPrediction, SegmentPrompt


@dataclass
class ObjectPrompt:
    label: str
    prompt: SegmentPrompt
    from_keypoints: bool  # keypoint groups update the refinement state, rectangles the remembered boxes


@dataclass(frozen=True)
class PercentRectangle:
    """A rectangle as Label Studio sends it: top-left corner, width and height in percent of the image's width
    and height, turned `rotation` degrees clockwise about that corner."""

    x: float
    y: float
    width: float
    height: float
    rotation: float


@dataclass
class PixelPrompts:
    keypoints: dict[str, list[Point]]  # label -> points in pixels
    rectangles: dict[str, list[Box]]  # label -> boxes in pixels
    exemplars: dict[str, list[tuple[Box, bool]]] = field(default_factory=dict)  # label -> (box, positive)


@dataclass
class ContextPrompts:
    """A smart-tool context, checked in full, in Label Studio's percent of the image: reading it needs no image,
    so a bad one is refused before any download."""

    keypoints: dict[str, list[Point]] = field(default_factory=dict)  # label -> points in percent
    rectangles: dict[str, list[PercentRectangle]] = field(default_factory=dict)
    texts: list[str] = field(default_factory=list)
    text_label: str | None = None  # the label a text prompt was given, when the client sends one
    # label -> SAM 3 exemplar boxes drawn with the exemplar control, each with whether it is a positive one
    exemplars: dict[str, list[tuple[PercentRectangle, bool]]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.keypoints or self.rectangles or self.texts or self.exemplars)

    @property
    def region_labels(self) -> list[str]:
        """The labels the keypoints, rectangles and exemplars ask masks for."""
        return list(dict.fromkeys([*self.keypoints, *self.rectangles, *self.exemplars]))

    def in_pixels(self, image_size: tuple[int, int]) -> PixelPrompts:
        """The keypoints and rectangles in pixels of the (height, width) image."""
        height, width = image_size
        keypoints = {
            label: [(x / 100 * width, y / 100 * height, positive) for x, y, positive in points]
            for label, points in self.keypoints.items()
        }
        rectangles = {
            label: [_pixel_box(rectangle, width, height) for rectangle in boxes]
            for label, boxes in self.rectangles.items()
        }
        exemplars = {
            label: [(_pixel_box(rectangle, width, height), positive) for rectangle, positive in boxes]
            for label, boxes in self.exemplars.items()
        }
        return PixelPrompts(keypoints, rectangles, exemplars)


def _number(value: dict, key: str, unit: str, default: float | None = None) -> float:
    raw = value.get(key, default)
    try:
        number = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else math.nan
    except OverflowError:  # a JSON integer beyond float range
        number = math.nan
    if not math.isfinite(number):
        raise PromptError(f"context value {key!r} must be a number of {unit}, got {repr(raw)[:40]}", 400)
    return number


def _label_of(item: dict, value: dict, key: str) -> str:
    labels = value.get(key) or value.get("labels")
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
        raise PromptError(f"context region {item.get('id')!r} has no label in value.{key}", 400)
    return labels[0]


def _check_inside(x: float, y: float, what: str) -> None:
    # Label Studio keeps regions within the image; a little slack absorbs rounding at the border.
    if not (-0.5 <= x <= 100.5 and -0.5 <= y <= 100.5):
        # Six significant digits: a value like 1e308 stays short instead of becoming a 300-digit number.
        raise PromptError(f"{what} at ({x:.6g}%, {y:.6g}%) lies outside the image (0-100%)", 422)


def _rotated_bounds(x: float, y: float, width: float, height: float, degrees: float) -> Box:
    """Axis-aligned bounds of a rectangle turned `degrees` clockwise (y pointing down) about its top-left corner,
    as Label Studio's canvas turns it. Lengths must share one unit (pixels): a turn mixes width and height."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [
        (x + dx * cos - dy * sin, y + dx * sin + dy * cos)
        for dx, dy in ((0, 0), (width, 0), (0, height), (width, height))
    ]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return min(xs), min(ys), max(xs), max(ys)


def _pixel_box(rectangle: PercentRectangle, width: int, height: int) -> Box:
    """The pixel box SAM gets for a rectangle: its bounds, once turned, clipped to the image."""
    x0, y0, x1, y1 = _rotated_bounds(
        rectangle.x / 100 * width,
        rectangle.y / 100 * height,
        rectangle.width / 100 * width,
        rectangle.height / 100 * height,
        rectangle.rotation,
    )
    # Only a turned rectangle can reach outside here: read_context checked an unturned one in full.
    _check_inside(x0 / width * 100, y0 / height * 100, "rectangle corner")
    _check_inside(x1 / width * 100, y1 / height * 100, "rectangle corner")
    return max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))


def _read_rectangle(value: dict) -> PercentRectangle:
    rectangle = PercentRectangle(
        _number(value, "x", "percent"),
        _number(value, "y", "percent"),
        _number(value, "width", "percent"),
        _number(value, "height", "percent"),
        _number(value, "rotation", "degrees", 0.0) % 360,
    )
    if rectangle.width <= 0 or rectangle.height <= 0:
        raise PromptError("a rectangle needs a positive width and height", 422)
    _check_inside(rectangle.x, rectangle.y, "rectangle corner")
    if rectangle.rotation == 0:
        _check_inside(rectangle.x + rectangle.width, rectangle.y + rectangle.height, "rectangle corner")
    return rectangle


def read_context(context: object, max_prompts: int, exemplar_control: str | None = None) -> ContextPrompts:
    """Read and check every region of a smart-tool context; coordinates stay in percent of the image. Rectangles
    from `exemplar_control` (the label config's exemplar RectangleLabels) are SAM 3's exemplars, positive unless
    the region says `is_positive: false`, as a negative keypoint does; every label needs a positive one.

    Label Studio 1.23 sends x/y/width/height in percent of the image as decoded (its natural size, which
    original_width/original_height repeat), whatever `image_rotation` the annotator turned the view by: the Image
    tag turns its whole canvas (ImageView.jsx's Stage gets `rotation`), maps each pointer position back through
    the inverse of that transform (Image.js `fixZoomedCoords`) and only then into percent of the unturned image
    (`canvasToInternalX/Y`). So `image_rotation` is read as a number and otherwise needs no handling here."""
    prompts = ContextPrompts()
    if not context:
        return prompts
    if not isinstance(context, dict) or not isinstance(context.get("result", []), list):
        raise PromptError("params.context must be an object with a 'result' list", 400)
    items = context.get("result") or []
    if len(items) > max_prompts:
        raise PromptError(f"context holds {len(items)} regions; at most {max_prompts} are accepted", 413)
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise PromptError("every context region needs a 'value' object", 400)
        _number(item, "image_rotation", "degrees", 0.0)
        value = item["value"]
        kind = item.get("type")
        if kind == "keypointlabels":
            x, y = _number(value, "x", "percent"), _number(value, "y", "percent")
            _check_inside(x, y, "keypoint")
            positive = item.get("is_positive", True) is not False
            label = _label_of(item, value, "keypointlabels")
            prompts.keypoints.setdefault(label, []).append((x, y, int(positive)))
        elif kind == "rectanglelabels":
            rectangle = _read_rectangle(value)
            label = _label_of(item, value, "rectanglelabels")
            if exemplar_control is not None and item.get("from_name") == exemplar_control:
                positive = item.get("is_positive", True) is not False
                prompts.exemplars.setdefault(label, []).append((rectangle, positive))
            else:
                prompts.rectangles.setdefault(label, []).append(rectangle)
        elif kind == "textarea":
            texts = value.get("text")
            if isinstance(texts, str):
                texts = [texts]
            if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
                raise PromptError("a textarea region needs value.text as a list of strings", 400)
            prompts.texts.extend(texts)
            chosen = value.get("brushlabels") or value.get("rectanglelabels") or value.get("labels")
            if isinstance(chosen, list) and chosen and isinstance(chosen[0], str):
                prompts.text_label = chosen[0]
        else:
            raise PromptError(f"context region type {kind!r} is not a smart keypoint, rectangle or text prompt", 422)
    for label, boxes in prompts.exemplars.items():
        if not any(positive for _, positive in boxes):
            raise PromptError(f"the exemplar boxes of {label!r} are all negative: draw one around a wanted one", 422)
    return prompts


def _box_contains(box: Box, points: list[Point]) -> bool:
    return all(box[0] <= x <= box[2] and box[1] <= y <= box[3] for x, y, positive in points if positive)


def _box_area(box: Box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


class InteractivePrompter:
    """Builds prompts for one task's image and writes back what the next request needs."""

    def __init__(self, sessions: SessionStore, image_digest: str, task_id: object) -> None:
        self.sessions = sessions
        self.image_digest = image_digest
        self.task_id = task_id

    def prompts(self, parsed: PixelPrompts) -> list[ObjectPrompt]:
        objects: list[ObjectPrompt] = []
        for label, boxes in parsed.rectangles.items():
            objects.extend(ObjectPrompt(label, SegmentPrompt(box=box), from_keypoints=False) for box in boxes)
        for label, points in parsed.keypoints.items():
            session = self.sessions.load(self.image_digest, self.task_id, label)
            box = self._box_for(session, points)
            logits = None
            # Earlier logits only help while the annotator keeps adding points to the same object;
            # the same points sent again get the same mask as before.
            if session.mask_logits is not None and session.box == box and set(session.points) < set(points):
                logits = session.mask_logits
            prompt = SegmentPrompt(
                points=[(x, y) for x, y, _ in points],
                point_labels=[positive for _, _, positive in points],
                box=box,
                mask_logits=logits,
            )
            objects.append(ObjectPrompt(label, prompt, from_keypoints=True))
        return objects

    @staticmethod
    def _box_for(session: Session, points: list[Point]) -> Box | None:
        """The smallest remembered box holding every positive click, if any does."""
        holding = [box for box in session.boxes if _box_contains(box, points)]
        return min(holding, key=_box_area) if holding else None

    def remember(self, objects: list[ObjectPrompt], predictions: list[MaskPrediction]) -> None:
        boxes_by_label: dict[str, list[Box]] = {}
        for obj, prediction in zip(objects, predictions, strict=True):
            if obj.from_keypoints:
                session = self.sessions.load(self.image_digest, self.task_id, obj.label)
                prompt = obj.prompt
                session.points = [
                    (x, y, label) for (x, y), label in zip(prompt.points, prompt.point_labels, strict=True)
                ]
                session.box = prompt.box
                session.mask_logits = prediction.low_res_logits
                self.sessions.save(self.image_digest, self.task_id, obj.label, session)
            elif obj.prompt.box is not None:  # a rectangle's prompt, which always has its box
                boxes_by_label.setdefault(obj.label, []).append(obj.prompt.box)
        for label, boxes in boxes_by_label.items():
            session = self.sessions.load(self.image_digest, self.task_id, label)
            # Label Studio sends every rectangle of the label each time: the latest list is the truth.
            session.boxes = boxes
            self.sessions.save(self.image_digest, self.task_id, label, session)
