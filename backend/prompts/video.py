"""A <Video> task's request → the VideoRectangle regions to track, checked before anything is downloaded.

The regions come from the request's context (Label Studio's interactive API forwards a `result` list as it is), else
from the task's latest annotation or draft that has VideoRectangle regions: Label Studio 1.23.2's editor sends nothing
while a video box is drawn (docs/video.md), so an annotator draws keyframes, saves, and asks for predictions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from backend.errors import BadRequest, VideoError
from backend.protocol.label_config import VideoConfig
from backend.protocol.video import VideoObject, video_objects


def keyframe_objects(
    task: Mapping[str, Any], context: object, config: VideoConfig, max_objects: int
) -> list[VideoObject]:
    """The regions to track: the context's, else those of the task's most recent annotation or draft that has any.
    None at all, in a project with labels: [] (the labels are detected and tracked, zero-click pre-annotation);
    without labels, BadRequest naming what to do; VideoError (413) for more than `max_objects` (MAX_VIDEO_OBJECTS),
    before anything is downloaded."""
    if context is not None:
        if not isinstance(context, Mapping) or not isinstance(context.get("result"), list):
            raise BadRequest(
                "a video request's context must be an object with a 'result' list of VideoRectangle regions"
            )
        objects = _trackable(video_objects(context["result"], to_name=config.video_name))
    else:
        objects = drawn_objects(task, config)
    if len(objects) > max_objects:
        raise VideoError(f"{len(objects)} objects to track in one video; MAX_VIDEO_OBJECTS allows {max_objects}", 413)
    if not objects and not config.labels:
        raise BadRequest(
            f"task {task.get('id')} has no VideoRectangle box to track: draw a box on the objects in one or more "
            "frames, save the annotation, then retrieve predictions (or add a <Labels> control on the video, for "
            "the backend to find its labels itself)",
            422,
        )
    return objects


def drawn_objects(task: Mapping[str, Any], config: VideoConfig) -> list[VideoObject]:
    """The regions of the task's most recent annotation or draft that has any, none if none has."""
    for source in _latest_first(task):
        objects = _trackable(video_objects(source, to_name=config.video_name))
        if objects:
            return objects
    return []


def _trackable(objects: list[VideoObject]) -> list[VideoObject]:
    """Regions with a box shown on at least one frame: one made only of disabled keyframes gives no prompt."""
    return [obj for obj in objects if any(keyframe.enabled for keyframe in obj.keyframes)]


def _latest_first(task: Mapping[str, Any]) -> list[list]:
    """The result lists of the task's annotations and drafts, the most recently updated first."""
    entries = [
        entry
        for key in ("drafts", "annotations")
        for entry in task.get(key) or []
        if isinstance(entry, Mapping) and isinstance(entry.get("result"), list) and not entry.get("was_cancelled")
    ]
    entries.sort(key=lambda entry: str(entry.get("updated_at") or entry.get("created_at") or ""), reverse=True)
    return [entry["result"] for entry in entries]
