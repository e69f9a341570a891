"""A video file → its frames as RGB arrays, decoded as a stream (PyAV), never the whole video in memory.

`VideoFile.open` reads only the container's header and checks the caps (frames, pixels per frame) before a single
frame is decoded, so a video that declares too much is refused at once. `frames(start, stop)` seeks to the key frame
at or before `start` and decodes forward from there, so reading a span late in a long video, or reading a video
backwards in spans (as backward tracking does), costs the span and the distance from its key frame, not the whole
video. Frames are numbered from 0 in presentation order, by their timestamps at the stream's average rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from backend.errors import VideoError


@dataclass(frozen=True)
class VideoLimits:
    """What a request may make the backend decode (MAX_VIDEO_FRAMES, MAX_VIDEO_PIXELS)."""

    max_frames: int
    max_pixels: int  # width × height of one frame


@dataclass(frozen=True)
class VideoFile:
    """A video on disk and what its container declares: frame count, size, and rate."""

    path: Path
    frame_count: int
    width: int
    height: int
    fps: float

    @property
    def duration(self) -> float:
        return self.frame_count / self.fps

    @classmethod
    def open(cls, path: Path, limits: VideoLimits) -> VideoFile:
        """The video's header, checked against `limits`; VideoError naming what is wrong, before any decoding."""
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise VideoError(f"{path.name} holds no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                if not rate:
                    raise VideoError(f"{path.name} declares no frame rate")
                width, height = stream.codec_context.width, stream.codec_context.height
                frame_count = stream.frames or _count_from_duration(container, stream, rate)
        except av.FFmpegError as error:
            raise VideoError(f"cannot read the video {path.name}: {error}") from error
        if width <= 0 or height <= 0 or frame_count <= 0:
            raise VideoError(f"{path.name} declares {frame_count} frames of {width}x{height}: not a video")
        if width * height > limits.max_pixels:
            raise VideoError(
                f"video frames of {width}x{height} exceed MAX_VIDEO_PIXELS={limits.max_pixels}: "
                "downscale the video or raise the limit",
                status=413,
            )
        if frame_count > limits.max_frames:
            raise VideoError(
                f"the video has {frame_count} frames, more than MAX_VIDEO_FRAMES={limits.max_frames}: "
                "cut it into shorter tasks or raise the limit",
                status=413,
            )
        return cls(path, frame_count, width, height, float(rate))

    def frames(self, start: int = 0, stop: int | None = None, every: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """(index, height×width×3 uint8 RGB) for each frame with start <= index < stop, in order; at most
        `frame_count` frames, whatever the stream holds beyond its header. With `every` > 1, only every `every`-th
        frame from `start` is converted to pixels (the others are decoded, as the codec needs, and skipped)."""
        stop = self.frame_count if stop is None else min(stop, self.frame_count)
        if start >= stop:
            return
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                rate = Fraction(stream.average_rate or stream.guessed_rate or self.fps)
                if start > 0 and stream.time_base is not None:
                    # Seeking lands on the key frame at or before the target: decoding goes on from there.
                    container.seek(int(Fraction(start) / rate / stream.time_base), stream=stream, backward=True)
                expected = start
                for frame in container.decode(stream):
                    index = _frame_index(frame, rate, expected)
                    expected = index + 1
                    if index < start:
                        continue
                    if index >= stop:
                        return
                    if (index - start) % every:
                        continue
                    yield index, frame.to_ndarray(format="rgb24")
        except av.FFmpegError as error:
            raise VideoError(f"cannot decode the video {self.path.name}: {error}") from error


def _frame_index(frame: av.VideoFrame, rate: Fraction, fallback: int) -> int:
    """The frame's number at the stream's rate, from its presentation time (the next number when it has none)."""
    if frame.pts is None or frame.time_base is None:
        return fallback
    return int(round(frame.pts * frame.time_base * rate))


def _count_from_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream, rate) -> int:
    """Frames a stream that does not state its count holds, from its (or the container's) duration."""
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    else:
        return 0
    return math.ceil(seconds * float(rate) - 1e-6)
