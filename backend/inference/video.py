"""A <Video> task's keyframe boxes → every object tracked through the video → Label Studio's VideoRectangle results.

The regions come read (backend.prompts.video). Each region's keyframes become the tracker's box prompts; its own
keyframes stay in the answer exactly as drawn, and the tracker's boxes where the annotator marked the object gone are
left out.

Label Studio numbers frames from 1 at the Video tag's `framerate`, which need not be the file's: frame f is the
picture at (f - 1) / framerate seconds. The conversion both ways is here, so the tracker works in decoded frames.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.config import Settings
from backend.deadline import TimeLimit
from backend.errors import BadRequest, DeadlineExceeded, VideoRegionError
from backend.images import Transfer
from backend.inference.base import StepReport
from backend.models.loader import BackgroundLoader
from backend.models.video_tracker import BoxPrompt, ObjectOnFrame, VideoTracker
from backend.protocol.label_config import VideoConfig
from backend.protocol.video import VideoBox, VideoObject, video_rectangle_result
from backend.videos import VideoFile, VideoLimits

log = logging.getLogger(__name__)

FetchToFile = Callable[[str, Transfer], AbstractContextManager[Path]]


@dataclass(frozen=True)
class VideoSettings:
    max_frames: int
    max_pixels: int
    max_bytes: int
    download_timeout_s: float
    model_ready_timeout_s: float
    keyframe_tolerance: float

    @classmethod
    def of(cls, settings: Settings) -> VideoSettings:
        return cls(
            settings.max_video_frames,
            settings.max_video_pixels,
            settings.max_video_bytes,
            settings.video_download_timeout_s,
            settings.model_ready_timeout_s,
            settings.video_keyframe_tolerance,
        )

    @property
    def transfer(self) -> Transfer:
        return Transfer("video", self.max_bytes, "MAX_VIDEO_BYTES", self.download_timeout_s, "VIDEO_DOWNLOAD_TIMEOUT")

    @property
    def limits(self) -> VideoLimits:
        return VideoLimits(self.max_frames, self.max_pixels)


@dataclass(frozen=True)
class FrameClock:
    """Label Studio's frame numbers (1-based, at the Video tag's framerate) against the file's decoded frames."""

    framerate: float  # the label config's
    fps: float  # the file's
    frame_count: int  # decoded frames

    @property
    def frames_count(self) -> int:
        """The video's length in Label Studio's frames, as its editor counts it: round(duration × framerate)."""
        return max(1, round(self.frame_count / self.fps * self.framerate))

    def index(self, frame: int) -> int:
        return min(self.frame_count - 1, max(0, round((frame - 1) * self.fps / self.framerate)))

    def frame(self, index: int) -> int:
        return min(self.frames_count, round(index * self.framerate / self.fps) + 1)


def _declared_gone(obj: VideoObject, frame: int) -> bool:
    """Whether the annotator said the object is gone on `frame`: it follows a disabled keyframe, before the next
    keyframe. The tracker's boxes there are left out, as drawn lifespans are the annotator's call."""
    before = [keyframe for keyframe in obj.keyframes if keyframe.frame <= frame]
    return bool(before) and not before[-1].enabled and before[-1].frame < frame


class VideoTracking:
    """Tracks a task's regions with the VIDEO_MODEL loaded in this process."""

    def __init__(self, settings: VideoSettings, fetch_to_file: FetchToFile, tracker: BackgroundLoader[VideoTracker]):
        self.settings = settings
        self.fetch_to_file = fetch_to_file
        self.tracker = tracker

    def track(
        self,
        video_url: object,
        objects: Sequence[VideoObject],
        config: VideoConfig,
        limit: TimeLimit,
        on_step: StepReport | None = None,
    ) -> list[dict[str, Any]]:
        """One VideoRectangle result per object: its keyframes as drawn, the tracked boxes on the other frames.
        `on_step(frames reached, frames)` after each frame step: a background run's progress, and its stop (the
        callback raises)."""
        if not isinstance(video_url, str) or not video_url:
            raise BadRequest(f"the task has no data.{config.video_field} with the video's URL")
        tracker = self.tracker.get(self.settings.model_ready_timeout_s)
        with self.fetch_to_file(video_url, self.settings.transfer) as path:
            video = VideoFile.open(path, self.settings.limits)
            clock = FrameClock(config.framerate, video.fps, video.frame_count)
            prompts = self._prompts(objects, clock, (video.height, video.width))
            # Per object, its latest state on each decoded frame (a frame tracked twice: the later stands).
            found: dict[int, dict[int, ObjectOnFrame]] = {number: {} for number in range(len(objects))}
            reached: set[int] = set()
            for done, tracked in enumerate(tracker.track(video, prompts), start=1):
                if limit.expired():
                    raise DeadlineExceeded(
                        f"tracking {len(objects)} objects through the video's {video.frame_count} frames takes longer "
                        f"than PREDICT_DEADLINE ({limit.seconds:g} s; {done} frame steps were done): track fewer "
                        "objects or a shorter video, or run a smaller VIDEO_MODEL or a GPU"
                    )
                for number, state in tracked.objects.items():
                    found[number][tracked.frame] = state
                if on_step is not None:
                    reached.add(tracked.frame)
                    on_step(len(reached), video.frame_count)
        return [
            self._result(obj, found[number], clock, (video.height, video.width), video.duration)
            for number, obj in enumerate(objects)
        ]

    @staticmethod
    def _prompts(objects: Sequence[VideoObject], clock: FrameClock, size: tuple[int, int]) -> list[BoxPrompt]:
        prompts = []
        for number, obj in enumerate(objects):
            for keyframe in obj.keyframes:
                # A disabled keyframe's box is shown on its own frame too: it prompts like any other.
                if keyframe.frame > clock.frames_count:
                    raise VideoRegionError(
                        f"region {obj.region_id!r} has a keyframe on frame {keyframe.frame}, past the video's "
                        f"{clock.frames_count} frames at the Video tag's framerate {clock.framerate:g}",
                        422,
                    )
                prompts.append(BoxPrompt(number, clock.index(keyframe.frame), keyframe.pixel_box(size)))
        return prompts

    def _result(
        self,
        obj: VideoObject,
        found: dict[int, ObjectOnFrame],
        clock: FrameClock,
        size: tuple[int, int],
        duration: float,
    ) -> dict[str, Any]:
        boxes: dict[int, VideoBox] = {}
        scores = []
        for index, state in sorted(found.items()):
            scores.append(state.score)
            frame = clock.frame(index)
            if state.box is not None and not _declared_gone(obj, frame):
                boxes.setdefault(frame, VideoBox.from_pixels(frame, state.box, size))
        score = sum(scores) / len(scores) if scores else None
        return video_rectangle_result(
            obj,
            list(boxes.values()),
            frames_count=clock.frames_count,
            duration=duration,
            framerate=clock.framerate,
            score=score,
            tolerance=self.settings.keyframe_tolerance,
        )
