"""The transformers models' prompt encoder + mask decoder on cached image features, run by PyTorch or ONNX Runtime.

Both run the model's own forward from image embeddings, so they compute the library's masks. ONNX Runtime runs
it traced, one graph per prompt shape (which of points, boxes and a mask prompt are given, and whether three
masks or one come out): a graph is exported from the loaded weights at the first prompt of its shape. The export
folds what depends on no prompt (the image-wide positional encoding, the "no mask" dense embedding), which
transformers recomputes on every call, into constants; with ONNX Runtime's faster kernels a click on a CPU takes
about a fifth of PyTorch's (bench/models.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from backend.models.onnx_graph import decoder_runtime, onnx_session

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
OUTPUT_NAMES = ["iou_scores", "pred_masks"]
POINT_INPUTS = ("input_points", "input_labels")  # their axis 2 is the number of points


# The family's mapping of the named image features to forward()'s arguments.
ImageInputs = Callable[[dict[str, torch.Tensor]], dict[str, object]]


class HfDecoder(Protocol):
    def run(self, image: Arrays, prompts: Arrays, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        """`image`: the named image features of one image (float16 as cached, or float32; no batch axis);
        `prompts`: forward()'s prompt arguments, one row per prompt. Returns the scores (prompts, masks) and low-res
        logits (prompts, masks, 256, 256)."""
        ...


class TorchHfDecoder:
    def __init__(self, model: torch.nn.Module, image_inputs: ImageInputs, device: torch.device) -> None:
        self.model = model
        self.image_inputs = image_inputs
        self.device = device

    def run(self, image: Arrays, prompts: Arrays, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        count = len(next(iter(prompts.values())))
        # A view of the one image per prompt: a mask prompt is added to the features per prompt inside the model.
        batched = {
            name: torch.as_tensor(np.asarray(value, dtype=np.float32), device=self.device)[None].expand(
                count, *value.shape
            )
            for name, value in image.items()
        }
        kwargs = {name: torch.as_tensor(value, device=self.device) for name, value in prompts.items()}
        with torch.inference_mode():
            output = self.model(**self.image_inputs(batched), **kwargs, multimask_output=multimask)
        return output.iou_scores[:, 0].float().cpu().numpy(), output.pred_masks[:, 0].float().cpu().numpy()


class _FromEmbeddings(torch.nn.Module):
    """The model's forward from image embeddings for one prompt shape, with the positional inputs a trace takes."""

    def __init__(
        self, model: torch.nn.Module, image_inputs: ImageInputs, names: list[str], image: int, multimask: bool
    ):
        super().__init__()
        self.model = model
        self.image_inputs = image_inputs
        self.image_names, self.prompt_names = names[:image], names[image:]
        self.multimask = multimask

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = {name: value.float() for name, value in zip(self.image_names, inputs, strict=False)}
        prompts = dict(zip(self.prompt_names, inputs[len(image) :], strict=True))
        output = self.model(**self.image_inputs(image), **prompts, multimask_output=self.multimask)
        return output.iou_scores, output.pred_masks


class OnnxHfDecoder:
    def __init__(self, model: torch.nn.Module, image_inputs: ImageInputs, threads: int) -> None:
        self.model = model
        self.image_inputs = image_inputs
        self.threads = threads
        self._sessions: dict[tuple[tuple[str, ...], bool], Any] = {}
        self._export_lock = threading.Lock()

    def run(self, image: Arrays, prompts: Arrays, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        count = len(next(iter(prompts.values())))
        # The graph takes the image features in float16, as the cache holds them: ONNX Runtime widens them several
        # times faster than numpy would.
        feed = {
            name: np.ascontiguousarray(np.broadcast_to(value.astype(np.float16, copy=False), (count, *value.shape)))
            for name, value in image.items()
        }
        feed.update(prompts)
        scores, masks = self._session(feed, len(image), multimask).run(OUTPUT_NAMES, feed)
        return scores[:, 0], masks[:, 0]

    def _session(self, feed: Arrays, image: int, multimask: bool):  # -> onnxruntime.InferenceSession
        names = list(feed)
        key = (tuple(names), multimask)
        with self._export_lock:
            if key not in self._sessions:
                self._sessions[key] = self._export(feed, image, multimask)
                log.info("exported the decoder for prompts %s (multimask %s) to ONNX Runtime", names[image:], multimask)
            return self._sessions[key]

    def _export(self, feed: Arrays, image: int, multimask: bool):  # -> onnxruntime.InferenceSession
        # Traced on two prompts of at least two points, so that neither axis is taken for a constant 1.
        example = {name: np.concatenate([value[:1]] * 2) for name, value in feed.items()}
        for name in POINT_INPUTS:
            if name in example and example[name].shape[2] == 1:
                example[name] = np.concatenate([example[name]] * 2, axis=2)
        dynamic = {name: {0: "prompts"} for name in feed}
        for name in POINT_INPUTS:
            if name in dynamic:
                dynamic[name][2] = "points"
        module = _FromEmbeddings(self.model, self.image_inputs, list(feed), image, multimask)
        tensors = tuple(torch.as_tensor(value) for value in example.values())
        return onnx_session(module, tensors, list(feed), OUTPUT_NAMES, dynamic, self.threads)


def make_hf_decoder(model: torch.nn.Module, image_inputs: ImageInputs, device: torch.device, runtime: str) -> HfDecoder:
    """`runtime` as DECODER_RUNTIME: ONNX Runtime by default on a CPU."""
    if decoder_runtime(device, runtime) == "onnx":
        return OnnxHfDecoder(model, image_inputs, torch.get_num_threads())
    return TorchHfDecoder(model, image_inputs, device)
