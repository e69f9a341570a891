"""SAM's prompt encoder + mask decoder + upscaling as one graph, run by PyTorch or ONNX Runtime.

Both runtimes execute segment-anything's own `SamOnnxModel` wrapper (with a mask upscaling that exports for any
image size, `AnySizeSamOnnxModel`), so they compute the same masks; ONNX Runtime is about twice as fast on a CPU
(bench/interactive.py measures both), PyTorch is used on GPUs (onnx_graph.py chooses and exports). The ONNX graph
is exported from the loaded weights at start-up, so a fine-tuned decoder is exported like the original.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel

from backend.models.onnx_graph import decoder_runtime, onnx_session

log = logging.getLogger(__name__)

INPUT_NAMES = ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
OUTPUT_NAMES = ["masks", "iou_predictions", "low_res_masks"]

DecoderOutput = tuple[np.ndarray, np.ndarray, np.ndarray]  # full-size logits, scores, low-res logits


class PromptDecoder(Protocol):
    def run(
        self,
        features: np.ndarray,
        coords: np.ndarray,
        labels: np.ndarray,
        mask_input: np.ndarray,
        has_mask_input: np.ndarray,
        image_size: np.ndarray,
    ) -> DecoderOutput: ...


class AnySizeSamOnnxModel(SamOnnxModel):
    """SamOnnxModel whose mask upscaling follows the image size given at run time. SamOnnxModel crops the padded
    1024x1024 mask with `int(...)` of the size, which the ONNX tracer freezes at the export example's: every image
    was then cropped as a 4:3 one, and on any other shape the masks came out stretched away from the clicks."""

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        prepadded_size = self.resize_longest_image_size(orig_im_size, self.img_size)
        # index_select with a range traces as ONNX Range + Gather, which keep the size an input of the graph.
        rows = torch.arange(prepadded_size[0], device=masks.device)
        columns = torch.arange(prepadded_size[1], device=masks.device)
        masks = masks.index_select(2, rows).index_select(3, columns)
        height, width = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)


class TorchDecoder:
    def __init__(self, sam: Sam, device: torch.device) -> None:
        self.device = device
        self.module = AnySizeSamOnnxModel(sam, return_single_mask=True).to(device).eval()

    def run(self, *arrays: np.ndarray) -> DecoderOutput:
        tensors = [torch.as_tensor(array, device=self.device) for array in arrays]
        with torch.inference_mode():
            masks, scores, low_res = self.module(*tensors)
        return masks.float().cpu().numpy(), scores.float().cpu().numpy(), low_res.float().cpu().numpy()


class OnnxDecoder:
    def __init__(self, sam: Sam, threads: int) -> None:
        example = (
            torch.zeros(1, 256, 64, 64),
            torch.zeros(1, 2, 2),
            torch.zeros(1, 2),
            torch.zeros(1, 1, 256, 256),
            torch.zeros(1),
            torch.tensor([480.0, 640.0]),
        )
        dynamic = {"point_coords": {0: "batch", 1: "points"}, "point_labels": {0: "batch", 1: "points"}}
        dynamic["mask_input"] = {0: "batch"}
        module = AnySizeSamOnnxModel(sam, return_single_mask=True)
        self.session = onnx_session(module, example, INPUT_NAMES, OUTPUT_NAMES, dynamic, threads)

    def run(self, *arrays: np.ndarray) -> DecoderOutput:
        masks, scores, low_res = self.session.run(OUTPUT_NAMES, dict(zip(INPUT_NAMES, arrays, strict=True)))
        return masks, scores, low_res


def make_decoder(sam: Sam, device: torch.device, runtime: str) -> PromptDecoder:
    """`runtime`: "torch", "onnx", or "auto" (ONNX Runtime on CPU when installed, PyTorch otherwise)."""
    if decoder_runtime(device, runtime) == "onnx":
        return OnnxDecoder(sam, torch.get_num_threads())
    return TorchDecoder(sam, device)
