"""Generated videos of moving shapes, written with PyAV as H.264 MP4, and each shape's true box on every frame.

Small (96×128 by default) and short, for the video tests and bench/video.py: a white rectangle moving right and a
red square moving up, on a dark background; a key frame every `gop` frames, so that seeking is exercised."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, ends exclusive


@dataclass(frozen=True)
class MovingShapes:
    path: Path
    frames: int
    height: int
    width: int
    fps: int
    boxes: dict[int, list[Box]]  # shape number -> its box on each frame

    def box(self, shape: int, frame: int) -> Box:
        return self.boxes[shape][frame]


def shape_boxes(frame: int, height: int, width: int) -> list[Box]:
    """Where the two shapes are on `frame`: each moves a pixel or two per frame and stays inside the picture."""
    rectangle_x = (width // 12 + 2 * frame) % max(1, width - width // 4)
    square_y = height - height // 4 - (frame % max(1, height // 2))
    return [
        (float(rectangle_x), height * 0.2, float(rectangle_x + width // 5), height * 0.5),
        (width * 0.7, float(square_y), width * 0.7 + height // 5, float(square_y + height // 5)),
    ]


def write_moving_shapes(
    path: Path, frames: int = 24, height: int = 96, width: int = 128, fps: int = 25, gop: int = 5
) -> MovingShapes:
    colours = [(255, 255, 255), (255, 0, 0)]
    boxes: dict[int, list[Box]] = {0: [], 1: []}
    pictures = []
    for frame in range(frames):
        picture = np.full((height, width, 3), 30, np.uint8)
        for shape, (box, colour) in enumerate(zip(shape_boxes(frame, height, width), colours, strict=True)):
            x0, y0, x1, y1 = (int(round(value)) for value in box)
            picture[y0:y1, x0:x1] = colour
            boxes[shape].append((float(x0), float(y0), float(x1), float(y1)))
        pictures.append(picture)
    write_frames(path, pictures, fps, gop)
    return MovingShapes(path, frames, height, width, fps, boxes)


def write_frames(path: Path, pictures: list[np.ndarray], fps: int = 25, gop: int = 5) -> Path:
    """RGB uint8 pictures, all of one size, as an H.264 MP4 with a key frame every `gop` frames."""
    height, width = pictures[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "12", "g": str(gop), "keyint_min": str(gop), "bf": "0"}
        for picture in pictures:
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
