"""The examples of one training, streamed through a spill file so that memory does not grow with the project.

Reading a training set whole held every annotation's masks at full size and every image's embedding (2 MiB for
SAM ViT) at once. Here annotations are added one at a time: each mask is reduced to the decoder's 256×256 grid (what
the loss compares) and written, with its full-size mask bit-packed for the evaluation and its image's embedding
(once per image), to an anonymous temporary file (TMPDIR; it disappears with the process). A training step or an
evaluation reads back only the examples it uses. What stays in memory is a few numbers per mask.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np
import torch

from backend.models.base import ImageEmbedding
from backend.models.sam import LOW_RES_SIZE
from backend.training.finetune import Example, grid_target

FEATURES_DTYPE = np.float16


@dataclass(frozen=True)
class _Slot:
    offset: int
    length: int


@dataclass(frozen=True)
class _Image:
    features: _Slot
    shape: tuple[int, ...]
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass(frozen=True)
class _Entry:
    task_id: int
    image: _Image
    target: _Slot  # bit-packed (256, 256)
    mask: _Slot  # bit-packed (H, W) at the image's own size


class TrainingExamples:
    """One training's examples: `add_image` and `add` write them to the spill file, `of_tasks` reads them back."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="sam-training-")
        self._images: dict[str, _Image] = {}
        self._entries: list[_Entry] = []

    def __enter__(self) -> TrainingExamples:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()

    def _put(self, data: bytes) -> _Slot:
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(data)
        self._file.flush()
        return _Slot(offset, len(data))

    def _get(self, slot: _Slot) -> bytes:
        data = os.pread(self._file.fileno(), slot.length, slot.offset)
        if len(data) != slot.length:
            raise OSError(f"the training's spill file ended early ({len(data)} of {slot.length} bytes)")
        return data

    def has_image(self, key: str) -> bool:
        return key in self._images

    def add_image(self, key: str, embedding: ImageEmbedding) -> None:
        features = np.ascontiguousarray(embedding.features, dtype=FEATURES_DTYPE)
        self._images[key] = _Image(
            self._put(features.tobytes()),
            features.shape,
            (int(embedding.input_size[0]), int(embedding.input_size[1])),
            (int(embedding.original_size[0]), int(embedding.original_size[1])),
        )

    def add(self, task_id: int, image_key: str, mask: np.ndarray) -> None:
        """One mask of an image added before; raises ValueError as `grid_target` does."""
        image = self._images[image_key]
        target = grid_target(mask, image.input_size, image.original_size)
        self._entries.append(
            _Entry(
                task_id,
                image,
                self._put(np.packbits(target.numpy(), axis=None).tobytes()),
                self._put(np.packbits(mask, axis=None).tobytes()),
            )
        )

    def tasks(self) -> list[int]:
        return sorted({entry.task_id for entry in self._entries})

    def of_tasks(self, tasks: set[int]) -> Sequence[Example]:
        return _Examples(self, [entry for entry in self._entries if entry.task_id in tasks])

    def read(self, entry: _Entry) -> Example:
        image = entry.image
        features = np.frombuffer(self._get(image.features), dtype=FEATURES_DTYPE).reshape(image.shape)
        target = _unpack(self._get(entry.target), (LOW_RES_SIZE, LOW_RES_SIZE))
        return Example(
            features=features,
            target=torch.from_numpy(target),
            load_mask=lambda: _unpack(self._get(entry.mask), image.original_size),
            input_size=image.input_size,
            original_size=image.original_size,
        )


def _unpack(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    height, width = shape
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=height * width)
    return bits.reshape(height, width).view(bool)


class _Examples(Sequence[Example]):
    """Some of a training's examples, each read from the spill file when it is asked for."""

    def __init__(self, examples: TrainingExamples, entries: list[_Entry]) -> None:
        self._examples = examples
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Example]: ...

    def __getitem__(self, index: int | slice) -> Example | Sequence[Example]:
        if isinstance(index, slice):
            return _Examples(self._examples, self._entries[index])
        return self._examples.read(self._entries[index])
