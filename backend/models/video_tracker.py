"""Boxes drawn on a few frames → every object tracked through the video, all objects in one pass, with transformers'
SAM 2.1, EdgeTAM and SAM 3 video predictors (`Sam2VideoModel`, `EdgeTamVideoModel`, `Sam3TrackerVideoModel`).

The calls are the library's documented ones: each keyframe's boxes added to an inference session and run on their
frame, then `forward` frame after frame from the first keyframe to the end, then backwards from it to the start, as
`propagate_in_video_iterator` does. What differs is memory. The library's session keeps every frame's pixels
(3×1024×1024 floats, 12 MB a frame) and every frame's outputs; here no session holds pixels (a frame is decoded and
encoded when it is tracked, and its features handed to the sessions), and a frame's outputs are dropped once no later
frame can read them: the memory attention reads the last `num_maskmem` - 1 frames and the object pointers of the last
`max_object_pointers_in_encoder` - 1, so outputs older than both are dead, except those just after an object's first
keyframe, which its backward pass reads. So memory grows with the objects and keyframes, not with the video's length,
and each object's output equals the library's (tests/test_video.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from backend.models.hf_segmenter import model_config, weights_digest
from backend.protocol.polygons import tight_box

log = logging.getLogger(__name__)

# Frames decoded at once when walking backwards: a span is decoded forwards, then tracked in reverse.
BACKWARD_SPAN = 16


class FrameSource(Protocol):
    """A video's frames by index (backend.videos.VideoFile is one)."""

    @property
    def frame_count(self) -> int: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    def frames(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]: ...


@dataclass(frozen=True)
class BoxPrompt:
    """An object's box on one frame, in pixels of the video: x0, y0, x1, y1."""

    object_id: int
    frame: int  # 0-based
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class ObjectOnFrame:
    """Where one object is on one frame: its mask's tight box in pixels (None where the model finds it absent), the
    model's confidence that it is present (the sigmoid of its object score), and its low-resolution mask logits."""

    box: tuple[float, float, float, float] | None
    score: float
    mask_logits: np.ndarray  # (1, h, w), as the model outputs them


@dataclass(frozen=True)
class TrackedFrame:
    """One frame's result for the objects tracked on it. A frame can come twice (forward, then backward): the
    later result is the one that stands, as in the library's own propagation."""

    frame: int
    objects: dict[int, ObjectOnFrame]


@dataclass(frozen=True)
class VideoFamily:
    """What differs between the transformers video predictors."""

    model_types: tuple[str, ...]  # config.json model_types whose folder holds the model
    config_class: str
    model_class: str
    processor_class: str
    container: tuple[str, str] | None = None  # (model_type, key) of a config that holds this one as a part


VIDEO_FAMILIES = {
    # facebook/sam2.1-* hold the whole SAM 2.1 (memory modules included) under the image model's type.
    "sam2_video": VideoFamily(("sam2_video", "sam2"), "Sam2VideoConfig", "Sam2VideoModel", "Sam2VideoProcessor"),
    "edgetam_video": VideoFamily(("edgetam_video",), "EdgeTamVideoConfig", "EdgeTamVideoModel", "Sam2VideoProcessor"),
    # facebook/sam3 is a sam3_video model; transformers' key mapping reads the tracker's tensors out of it.
    "sam3_tracker_video": VideoFamily(
        ("sam3_tracker_video",),
        "Sam3TrackerVideoConfig",
        "Sam3TrackerVideoModel",
        "Sam3TrackerVideoProcessor",
        container=("sam3_video", "tracker_config"),
    ),
}


def load_video_tracker(folder: Path, family_name: str, name: str, device: torch.device) -> VideoTracker:
    """The video predictor of `family_name` saved in `folder`; WrongCheckpoint when the folder holds another model."""
    import transformers

    family = VIDEO_FAMILIES[family_name]
    content = model_config(
        folder, f"VIDEO_CHECKPOINT={folder}", family.model_types, family.container, name, "VIDEO_MODEL"
    )
    config = getattr(transformers, family.config_class)(**content)
    model = getattr(transformers, family.model_class).from_pretrained(folder, config=config, local_files_only=True)
    # Frames go through the image processor, one at a time. The processor's video half (which resizes and normalises
    # a whole video at once, to the same pixels) is built with the image processor's own size and normalisation:
    # model folders hold only the image processor's settings (SAM 2.1's preprocessor_config.json, SAM 3's
    # processor_config.json, which normalises around 0.5 where SAM 2's video default uses ImageNet's statistics).
    image_processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    video_processor = transformers.Sam2VideoVideoProcessor(
        size=image_processor.size, image_mean=image_processor.image_mean, image_std=image_processor.image_std
    )
    processor = getattr(transformers, family.processor_class)(image_processor, video_processor)
    identity = f"{name}-{weights_digest(folder)[:16]}"
    log.info("loaded %s %s from %s", family.model_class, identity, folder)
    return VideoTracker(model, processor, identity, device)


class FrameCount(dict):
    """A session's frames: none are held (each frame's features reach the session through its cache), but the model
    reads the video's frame count as this dict's `len()`, to cap how far back it looks for object pointers."""

    def __init__(self, frame_count: int) -> None:
        super().__init__()
        self.frame_count = frame_count

    def __len__(self) -> int:
        return self.frame_count


class VideoTracker:
    """A transformers video predictor: tracks one video at a time (a track already keeps every core busy).

    Each object has its own inference session, so an object's track depends on its own boxes alone, whatever else is
    tracked beside it (the library's per-object loop would otherwise let one object's keyframes decide where another's
    propagation starts). The sessions share each frame's decoding and image encoding, the costly part: the encoder's
    output goes into every session's feature cache, where the model looks before encoding a frame itself.
    """

    def __init__(self, model: Any, processor: Any, identity: str, device: torch.device) -> None:
        self.model = model.to(device).eval()  # a transformers video model: its calls are untyped
        self.processor = processor
        self.identity = identity
        self.device = device
        config = model.config
        # Outputs of frames further than this from the one being tracked are never read again.
        self.memory_reach = int(max(config.num_maskmem, config.max_object_pointers_in_encoder))
        self._lock = threading.Lock()

    def track(self, video: FrameSource, prompts: Sequence[BoxPrompt]) -> Iterator[TrackedFrame]:
        """Every frame's objects: each object's keyframes first, then each object forward from its first keyframe to
        the end, then backward from it to frame 0. A frame tracked twice comes twice; the later result stands."""
        if not prompts:
            return
        with self._lock, torch.inference_mode():
            sessions = {prompt.object_id: self._session(video) for prompt in prompts}
            first = {object_id: min(p.frame for p in prompts if p.object_id == object_id) for object_id in sessions}
            for frame in sorted({prompt.frame for prompt in prompts}):
                ((index, pixels),) = list(video.frames(frame, frame + 1))
                on_frame = [prompt for prompt in prompts if prompt.frame == frame]
                for prompt in on_frame:
                    self.processor.add_inputs_to_inference_session(
                        sessions[prompt.object_id],
                        frame_idx=frame,
                        obj_ids=[prompt.object_id],
                        input_boxes=[[list(prompt.box)]],
                    )
                yield self._step(sessions, [prompt.object_id for prompt in on_frame], index, pixels, reverse=False)
            for index, pixels in video.frames(min(first.values())):
                tracked = [object_id for object_id in sessions if first[object_id] <= index]
                yield self._step(sessions, tracked, index, pixels, reverse=False)
                for object_id in tracked:
                    self._forget(sessions[object_id], index - self.memory_reach, first[object_id] + self.memory_reach)
            # As the library's backward propagation, none for an object whose first keyframe is frame 0.
            for stop in range(max(first.values()) + 1, 0, -BACKWARD_SPAN):
                span = list(video.frames(max(0, stop - BACKWARD_SPAN), stop))
                for index, pixels in reversed(span):
                    tracked = [object_id for object_id, start in first.items() if 0 < start and index <= start]
                    if tracked:
                        yield self._step(sessions, tracked, index, pixels, reverse=True)
                    for object_id in tracked:
                        self._forget(sessions[object_id], index + self.memory_reach, 0)

    def _session(self, video: FrameSource) -> Any:
        session = self.processor.init_video_session(inference_device=self.device, dtype=torch.float32)
        session.video_height, session.video_width = video.height, video.width
        session.processed_frames = FrameCount(video.frame_count)
        return session

    def _step(
        self, sessions: dict[int, Any], object_ids: list[int], index: int, pixels: np.ndarray, reverse: bool
    ) -> TrackedFrame:
        """The frame encoded once, then each object's session run on it."""
        inputs = self.processor.image_processor(images=pixels, return_tensors="pt")
        encoded = self.model.get_image_features(inputs["pixel_values"].to(self.device), return_dict=True)
        features = {"vision_feats": encoded.fpn_hidden_states, "vision_pos_embeds": encoded.fpn_position_encoding}
        objects = {}
        for object_id in object_ids:
            session = sessions[object_id]
            session.cache.cache_vision_features(index, features)
            output = self.model(inference_session=session, frame_idx=index, reverse=reverse)
            objects[object_id] = self._object(output, (pixels.shape[0], pixels.shape[1]))
            # The full-size mask feeds this frame's memory encoding only (SAM 2.1's, 1024×1024 floats: 4 MiB, most
            # of what an output holds); no later frame reads it.
            for outputs in session.output_dict_per_obj.values():
                for stored in outputs.values():
                    if index in stored:
                        stored[index].pop("high_res_masks", None)
        return TrackedFrame(index, objects)

    def _object(self, output: Any, size: tuple[int, int]) -> ObjectOnFrame:
        low_res = output.pred_masks.float().cpu()  # (1, 1, h, w): the session tracks one object
        (masks,) = self.processor.post_process_masks([low_res], [list(size)], binarize=False)
        present = float(torch.sigmoid(output.object_score_logits.float().cpu()).reshape(-1)[0])
        return ObjectOnFrame(tight_box((masks[0, 0] > 0.0).numpy()), present, low_res[0].numpy())

    @staticmethod
    def _forget(session: Any, frame: int, keep_from: int) -> None:
        """Drop the output of `frame`, a frame tracking has moved past, unless it lies before `keep_from` (the first
        frames after the object's first keyframe, which its backward pass still reads)."""
        if frame >= keep_from:
            for outputs in session.output_dict_per_obj.values():
                outputs["non_cond_frame_outputs"].pop(frame, None)
