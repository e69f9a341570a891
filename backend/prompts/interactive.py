"""Label Studio's smart-tool context → SAM prompts, one per object.

Label Studio 1.23 sends, each time a smart region is drawn, every region of the annotation with the
same type and label: all keypoints of that label (one object, several positive and negative
clicks) or all rectangles of that label (one object each). The last rectangles of a task and label
are remembered so that later clicks inside one of them refine that box's object, and the previous
mask's logits are fed back while points are only being added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from backend.cache.sessions import Box, Point, Session, SessionStore
from backend.errors import PromptError
from backend.models.base import MaskPrediction, SegmentPrompt


@dataclass
class ObjectPrompt:
    label: str
    prompt: SegmentPrompt
    from_keypoints: bool  # keypoint groups update the refinement state, rectangles the remembered boxes


@dataclass
class ParsedContext:
    keypoints: dict[str, list[Point]]  # label -> points in pixels
    rectangles: dict[str, list[Box]]  # label -> boxes in pixels
    texts: list[str]
    text_label: str | None = None  # the label a text prompt was given, when the client sends one


def _percent(value: dict, key: str, default: float | None = None) -> float:
    raw = value.get(key, default)
    try:
        number = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else math.nan
    except OverflowError:  # a JSON integer beyond float range
        number = math.nan
    if not math.isfinite(number):
        raise PromptError(f"context value {key!r} must be a number of percent, got {repr(raw)[:40]}", 400)
    return number


def _label_of(item: dict, value: dict, key: str) -> str:
    labels = value.get(key) or value.get("labels")
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str):
        raise PromptError(f"context region {item.get('id')!r} has no label in value.{key}", 400)
    return labels[0]


def _check_inside(x: float, y: float, what: str) -> None:
    # Label Studio keeps regions within the image; a little slack absorbs rounding at the border.
    if not (-0.5 <= x <= 100.5 and -0.5 <= y <= 100.5):
        raise PromptError(f"{what} at ({x:.2f}%, {y:.2f}%) lies outside the image", 422)


def _rotated_bounds(x: float, y: float, width: float, height: float, degrees: float) -> tuple[float, ...]:
    """Axis-aligned bounds of a rectangle rotated about its top-left corner, as Label Studio rotates."""
    if not degrees:
        return x, y, x + width, y + height
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [
        (x + dx * cos - dy * sin, y + dx * sin + dy * cos)
        for dx, dy in ((0, 0), (width, 0), (0, height), (width, height))
    ]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    return min(xs), min(ys), max(xs), max(ys)


def parse_context(context: object, image_size: tuple[int, int], max_prompts: int) -> ParsedContext:
    """Read the context's regions; coordinates become pixels of the (height, width) image."""
    parsed = ParsedContext({}, {}, [])
    if not context:
        return parsed
    if not isinstance(context, dict) or not isinstance(context.get("result", []), list):
        raise PromptError("params.context must be an object with a 'result' list", 400)
    items = context.get("result") or []
    if len(items) > max_prompts:
        raise PromptError(f"context holds {len(items)} regions; at most {max_prompts} are accepted", 413)
    height, width = image_size
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise PromptError("every context region needs a 'value' object", 400)
        value = item["value"]
        kind = item.get("type")
        if kind == "keypointlabels":
            x, y = _percent(value, "x"), _percent(value, "y")
            _check_inside(x, y, "keypoint")
            positive = item.get("is_positive", True) is not False
            label = _label_of(item, value, "keypointlabels")
            parsed.keypoints.setdefault(label, []).append((x / 100 * width, y / 100 * height, int(positive)))
        elif kind == "rectanglelabels":
            x, y = _percent(value, "x"), _percent(value, "y")
            w, h = _percent(value, "width"), _percent(value, "height")
            if w <= 0 or h <= 0:
                raise PromptError("a rectangle needs a positive width and height", 422)
            x0, y0, x1, y1 = _rotated_bounds(x, y, w, h, _percent(value, "rotation", 0.0))
            _check_inside(x0, y0, "rectangle corner")
            _check_inside(x1, y1, "rectangle corner")
            label = _label_of(item, value, "rectanglelabels")
            box = (
                max(x0, 0) / 100 * width,
                max(y0, 0) / 100 * height,
                min(x1, 100) / 100 * width,
                min(y1, 100) / 100 * height,
            )
            parsed.rectangles.setdefault(label, []).append(box)
        elif kind == "textarea":
            texts = value.get("text")
            if isinstance(texts, str):
                texts = [texts]
            if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
                raise PromptError("a textarea region needs value.text as a list of strings", 400)
            parsed.texts.extend(texts)
            chosen = value.get("brushlabels") or value.get("rectanglelabels") or value.get("labels")
            if isinstance(chosen, list) and chosen and isinstance(chosen[0], str):
                parsed.text_label = chosen[0]
        else:
            raise PromptError(f"context region type {kind!r} is not a smart keypoint, rectangle or text prompt", 422)
    return parsed


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

    def prompts(self, parsed: ParsedContext) -> list[ObjectPrompt]:
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
            else:
                boxes_by_label.setdefault(obj.label, []).append(obj.prompt.box)
        for label, boxes in boxes_by_label.items():
            session = self.sessions.load(self.image_digest, self.task_id, label)
            # Label Studio sends every rectangle of the label each time: the latest list is the truth.
            session.boxes = boxes
            self.sessions.save(self.image_digest, self.task_id, label, session)
