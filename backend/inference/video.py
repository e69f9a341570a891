"""A <Video> task's keyframe boxes → every object tracked through the video → Label Studio's VideoRectangle results.

The regions come read (backend.prompts.video). Each region's keyframes become the tracker's box prompts; its own
keyframes stay in the answer exactly as drawn, and the tracker's boxes where the annotator marked the object gone are
left out.

A task with nothing drawn is pre-annotated with no clicks: the project's labels are detected on every
VIDEO_DETECT_EVERY-th frame, the detections linked into one chain per object (backend.prompts.video_chains), and each
chain tracked from its detections as from an annotator's keyframes.

Label Studio numbers frames from 1 at the Video tag's `framerate`, which need not be the file's: frame f is the
picture at (f - 1) / framerate seconds. The conversion both ways is here, so the tracker works in decoded frames.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backend.config import Settings
from backend.deadline import TimeLimit
from backend.errors import BadRequest, DeadlineExceeded, VideoRegionError
from backend.images import Transfer
from backend.inference.base import StepReport
from backend.inference.loading import Models
from backend.inference.text import TextDetection
from backend.models.loader import BackgroundLoader
from backend.models.video_tracker import BoxPrompt, ObjectOnFrame, VideoTracker
from backend.prompts.text import Thresholds, phrases_query
from backend.prompts.video_chains import Chain, FrameDetection, link_detections, strongest
from backend.protocol.label_config import VideoConfig
from backend.protocol.video import VideoBox, VideoObject, video_rectangle_result
from backend.videos import VideoFile, VideoLimits

log = logging.getLogger(__name__)

FetchToFile = Callable[[str, Transfer], AbstractContextManager[Path]]
# A decoded frame (its index, its RGB pixels) → what the project's labels find on it.
FrameDetector = Callable[[int, np.ndarray], list[FrameDetection]]


@dataclass(frozen=True)
class VideoSettings:
    max_frames: int
    max_pixels: int
    max_bytes: int
    download_timeout_s: float
    model_ready_timeout_s: float
    keyframe_tolerance: float
    max_objects: int
    detect_every: int

    @classmethod
    def of(cls, settings: Settings) -> VideoSettings:
        return cls(
            settings.max_video_frames,
            settings.max_video_pixels,
            settings.max_video_bytes,
            settings.video_download_timeout_s,
            settings.model_ready_timeout_s,
            settings.video_keyframe_tolerance,
            settings.max_video_objects,
            settings.video_detect_every,
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


def _chain_object(chain: Chain, config: VideoConfig, clock: FrameClock, size: tuple[int, int]) -> VideoObject:
    """A chain as the region an annotator would have drawn: a keyframe for each of its detections (the first on a
    Label Studio frame, where two decoded frames fall on one), its label, an id made from its first detection."""
    keyframes: dict[int, VideoBox] = {}
    for detection in chain.detections:
        frame = clock.frame(detection.frame)
        keyframes.setdefault(frame, VideoBox.from_pixels(frame, detection.box, size))
    first = chain.detections[0]
    region_id = hashlib.sha1(f"{chain.label}:{first.frame}:{first.box}".encode()).hexdigest()[:10]
    return VideoObject(region_id, config.rectangle, config.video_name, (chain.label,), tuple(keyframes.values()))


def label_detector(
    text: TextDetection, models: Callable[[], Models], settings: Settings
) -> Callable[[VideoConfig], FrameDetector]:
    """For a video project, the detector of its labels on one frame: its phrases (predicted_values) as the caption,
    BOX_THRESHOLD and TEXT_THRESHOLD, the same selection (NMS within a label, MAX_OBJECTS) as an image's
    pre-annotation. A detector that reads the segmenter's embeddings (SAM 3) gets the frame encoded by it."""

    def for_config(config: VideoConfig) -> FrameDetector:
        query = phrases_query(config.labels, config.phrases)
        thresholds = Thresholds(settings.box_threshold, settings.text_threshold)
        detector = text.ready(query)
        segmenter = models().segmenter if detector.shares_encoder else None

        def detect(index: int, pixels: np.ndarray) -> list[FrameDetection]:
            picture = segmenter.encode(pixels) if segmenter is not None else pixels
            (found,) = text.detect(detector, [picture], query, thresholds)
            return [FrameDetection(index, found_.box, found_.score, query.labels[found_.phrase]) for found_ in found]

        return detect

    return for_config


class VideoTracking:
    """Tracks a task's regions with the VIDEO_MODEL loaded in this process."""

    def __init__(
        self,
        settings: VideoSettings,
        fetch_to_file: FetchToFile,
        tracker: BackgroundLoader[VideoTracker],
        labels: Callable[[VideoConfig], FrameDetector] | None = None,
    ):
        self.settings = settings
        self.fetch_to_file = fetch_to_file
        self.tracker = tracker
        self.labels = labels  # the project's labels' detector on a frame, for tasks with nothing drawn

    def track(
        self,
        video_url: object,
        objects: Sequence[VideoObject],
        config: VideoConfig,
        limit: TimeLimit,
        on_step: StepReport | None = None,
    ) -> list[dict[str, Any]]:
        """One VideoRectangle result per object: its keyframes as drawn, the tracked boxes on the other frames.
        With no objects (a task with nothing drawn), the objects are the project's labels' detections, linked into
        one per object (zero-click pre-annotation). `on_step(frames reached, frames)` after each frame step of the
        track: a background run's progress, and its stop (the callback raises)."""
        if not isinstance(video_url, str) or not video_url:
            raise BadRequest(f"the task has no data.{config.video_field} with the video's URL")
        # The detector first: one that cannot load, or read the labels, is refused before the download.
        detect = None if objects else self._label_detector(config)
        tracker = self.tracker.get(self.settings.model_ready_timeout_s)
        with self.fetch_to_file(video_url, self.settings.transfer) as path:
            video = VideoFile.open(path, self.settings.limits)
            clock = FrameClock(config.framerate, video.fps, video.frame_count)
            if detect is not None:
                objects = self._detected_objects(video, clock, config, detect, limit, on_step)
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

    def _label_detector(self, config: VideoConfig) -> FrameDetector:
        if self.labels is None or not config.labels:
            raise BadRequest(
                "a video task with nothing drawn is pre-annotated from the project's labels: add a <Labels> control "
                "on the video, or draw a box on the objects and save",
                422,
            )
        return self.labels(config)

    def _detected_objects(
        self,
        video: VideoFile,
        clock: FrameClock,
        config: VideoConfig,
        detect: FrameDetector,
        limit: TimeLimit,
        on_step: StepReport | None,
    ) -> list[VideoObject]:
        """The project's labels detected on every VIDEO_DETECT_EVERY-th frame (decoded as a stream, one frame held
        at a time), linked into one chain per object; the MAX_VIDEO_OBJECTS strongest, each with its detections as
        keyframes. `on_step` hears of each frame searched as of no frame tracked yet (a stop is heard here too)."""
        every = self.settings.detect_every
        searched = 0

        def detections() -> Iterator[list[FrameDetection]]:
            nonlocal searched
            for index, pixels in video.frames(every=every):
                if limit.expired():
                    raise DeadlineExceeded(
                        f"detecting the project's labels on every {every} of the video's {video.frame_count} frames "
                        f"takes longer than PREDICT_DEADLINE ({limit.seconds:g} s; {searched} frames were searched): "
                        "raise VIDEO_DETECT_EVERY, use a shorter video, or run a GPU"
                    )
                yield detect(index, pixels)
                searched += 1
                if on_step is not None:
                    on_step(0, video.frame_count)

        chains = link_detections(detections())
        kept = strongest(chains, self.settings.max_objects)
        log.info(
            "zero-click video: %d frames searched, %d objects found, %d tracked (MAX_VIDEO_OBJECTS=%d)",
            searched,
            len(chains),
            len(kept),
            self.settings.max_objects,
        )
        return [_chain_object(chain, config, clock, (video.height, video.width)) for chain in kept]

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
