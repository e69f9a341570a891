"""SAM 2.1, EdgeTAM, SAM-HQ and SAM 3's tracker behind the `Segmenter` interface, through Hugging Face transformers' own
implementations (no compiled extension, no Hydra configs).

Each model is a folder in transformers' `save_pretrained` format (config.json, model.safetensors, the processor's
preprocessor_config.json): a local copy, or the official repository that `python -m backend weights download`
fetched at its pinned revision. Nothing is fetched here. The library's image processor prepares the pixels and
upscales the masks, so the masks are the library's own; the encoder's outputs that the decoder needs besides
the image embedding (SAM 2's high-resolution maps, SAM-HQ's early ViT features) travel in
`ImageEmbedding.extras`, and so in the embedding cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.errors import WrongCheckpoint
from backend.models.base import ImageEmbedding, MaskPrediction, SegmentPrompt, check_rgb_images
from backend.models.checkpoints import sha256_of
from backend.models.hf_decoder import make_hf_decoder

log = logging.getLogger(__name__)

# Prompts decoded in one model call: each carries its own copy of the image features (a mask prompt is added to
# them per prompt), which with SAM 2's high-resolution maps is about 17 MB in float32 (so 270 MB a chunk).
DECODE_CHUNK = 16

Arrays = dict[str, np.ndarray]

# The name under which a SAM 3 embedding also carries the image encoder's ViT output (1024×72×72): SAM 3's detector
# reads it (`DETECTOR=sam3` on the same folder), so one encode serves clicks and text prompts alike.
SAM3_BACKBONE = "backbone"


@dataclass(frozen=True)
class Family:
    """What differs between the transformers models: their classes, the encoder's outputs the decoder reads,
    and how the library upscales masks."""

    model_type: str  # config.json's model_type
    config_class: str
    model_class: str
    processor_class: str
    split: Callable[[Any], Arrays]  # get_image_embeddings' output -> named arrays of one batch
    decoder_inputs: Callable[[dict[str, torch.Tensor]], dict[str, object]]  # named arrays -> forward() kwargs
    padded: bool  # the image is resized along its longest side and padded (SAM-HQ), not stretched (SAM 2)
    # Another config.json model_type whose folder holds this model as a part, and the key of that part's config.
    container: tuple[str, str] | None = None


def _sam2_split(output: Any) -> Arrays:
    high_res_0, high_res_1, embedding = output
    return {"features": embedding, "high_res_0": high_res_0, "high_res_1": high_res_1}


def _sam2_inputs(arrays: dict[str, torch.Tensor]) -> dict[str, object]:
    return {"image_embeddings": [arrays["high_res_0"], arrays["high_res_1"], arrays["features"]]}


def _hq_split(output: Any) -> Arrays:
    embedding, intermediate = output
    return {"features": embedding, "vit_early": intermediate[0]}  # the only one SAM-HQ's decoder reads


def _hq_inputs(arrays: dict[str, torch.Tensor]) -> dict[str, object]:
    return {"image_embeddings": arrays["features"], "intermediate_embeddings": [arrays["vit_early"]]}


# Keyed by the official repository's model_type (`OfficialRepository.model_type`).
FAMILIES = {
    "sam2": Family("sam2", "Sam2Config", "Sam2Model", "Sam2Processor", _sam2_split, _sam2_inputs, padded=False),
    "edgetam": Family(
        "edgetam", "EdgeTamConfig", "EdgeTamModel", "Sam2Processor", _sam2_split, _sam2_inputs, padded=False
    ),
    "sam_hq": Family("sam_hq", "SamHQConfig", "SamHQModel", "SamHQProcessor", _hq_split, _hq_inputs, padded=True),
    # SAM 3's tracker: SAM 2's prompt encoder and mask decoder on SAM 3's image encoder, the same three feature maps
    # (at 1008 pixels: 256x72x72, and 32x288x288, 64x144x144 already projected). facebook/sam3 is a `sam3_video`
    # model (detector and tracker): its config's tracker_config describes this part, and transformers' own key
    # mapping for sam3_tracker reads the tracker's tensors out of the whole checkpoint (tracker_model.*, the shared
    # backbone under detector_model.vision_encoder.*, tracker_neck.*), ignoring the detector's.
    "sam3_video": Family(
        "sam3_tracker",
        "Sam3TrackerConfig",
        "Sam3TrackerModel",
        "Sam3TrackerProcessor",
        _sam2_split,
        _sam2_inputs,
        padded=False,
        container=("sam3_video", "tracker_config"),
    ),
}


def read_config(folder: Path, where: str) -> dict:
    """config.json in `folder`; WrongCheckpoint saying what the path is when it is no model folder."""
    config = folder / "config.json"
    if not folder.is_dir():
        raise WrongCheckpoint(
            f"{where} is a file; this model type loads a Hugging Face model folder (config.json, "
            "model.safetensors, preprocessor_config.json), as `python -m backend weights download` writes it"
        )
    if not config.is_file():
        raise WrongCheckpoint(f"{where} holds no config.json: not a Hugging Face model folder")
    try:
        content = json.loads(config.read_text())
    except ValueError as error:
        raise WrongCheckpoint(f"{where}/config.json is not JSON: {error}") from error
    if not isinstance(content, dict):
        raise WrongCheckpoint(f"{where}/config.json is not a JSON object")
    return content


def model_config(
    folder: Path,
    where: str,
    model_types: tuple[str, ...],
    container: tuple[str, str] | None,
    name: str,
    chooser: str,
) -> dict:
    """config.json's fields for a model of one of `model_types`, taken from its part of a `container` config
    where the folder holds a larger model; WrongCheckpoint naming the setting (`chooser`) when it holds another."""
    content = read_config(folder, where)
    holds = content.pop("model_type", None)
    if container is not None and holds == container[0]:
        part = content.get(container[1])
        if not isinstance(part, dict):
            raise WrongCheckpoint(f"{where}/config.json is a {holds} model without its {container[1]}")
        return {key: value for key, value in part.items() if key != "model_type"}
    if holds not in model_types:
        expected = " or ".join(repr(kind) for kind in (*model_types, *(container[:1] if container else ())))
        setting = where.partition("=")[0]
        raise WrongCheckpoint(
            f"{chooser}={name} loads a {expected} model but {where} holds a {holds!r} one; point "
            f"{setting} at the {name} folder or set {chooser} to the folder's model"
        )
    return content


def weights_digest(folder: Path) -> str:
    """The SHA-256 of the folder's weight file (of the shards' digests, in name order, for a sharded model): the
    identity embeddings are cached under."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise WrongCheckpoint(f"{folder} holds no model.safetensors")
    if len(files) == 1:
        return sha256_of(files[0])
    return hashlib.sha256("".join(sha256_of(path) for path in files).encode()).hexdigest()


def load_hf_segmenter(
    folder: Path,
    family_name: str,
    name: str,
    device: torch.device,
    decoder_runtime: str = "auto",
    keep_backbone: bool = False,
) -> HfSegmenter:
    """The model of `family_name` saved in `folder`; WrongCheckpoint when the folder holds another model.
    `keep_backbone` (SAM 3): each embedding carries the ViT's output too, under SAM3_BACKBONE, for the detector."""
    import transformers

    family = FAMILIES[family_name]
    accepted = (family.model_type,)
    content = model_config(folder, f"SAM_CHECKPOINT={folder}", accepted, family.container, name, "SAM_MODEL_TYPE")
    # The config is built from its fields rather than by from_pretrained: transformers 4.57 logs a loaded config
    # by comparing it with a default one, and EdgeTAM's default asks the hub for timm's RepViT config, which
    # fails offline. Built this way, nothing is fetched.
    config = getattr(transformers, family.config_class)(**content)
    model = getattr(transformers, family.model_class).from_pretrained(folder, config=config, local_files_only=True)
    processor = getattr(transformers, family.processor_class).from_pretrained(folder, local_files_only=True)
    # Embeddings with the backbone's output are other cache entries than those without.
    identity = f"{name}-{weights_digest(folder)[:16]}" + ("+" + SAM3_BACKBONE if keep_backbone else "")
    log.info("loaded %s %s from %s", family.model_class, identity, folder)
    return HfSegmenter(model, processor, family, identity, device, decoder_runtime, keep_backbone)


class HfSegmenter:
    """A transformers SAM-style model: encoder once per image, decoder per prompt, safe from many threads."""

    def __init__(
        self,
        model: torch.nn.Module,
        processor: object,
        family: Family,
        identity: str,
        device: torch.device,
        decoder_runtime: str = "auto",
        keep_backbone: bool = False,
    ):
        self.model = model.to(device).eval()
        self.decoder = make_hf_decoder(self.model, family.decoder_inputs, device, decoder_runtime)
        self.processor = processor
        self.family = family
        self.device = device
        self._identity = identity
        self._encode_lock = threading.Lock()  # one encoder pass at a time: concurrent ones only split the cores
        self._encoder_autocast = device.type == "cuda"
        self._backbone_output: torch.Tensor | None = None  # the last encode's ViT output, when it is kept
        if keep_backbone:
            self.model.vision_encoder.backbone.register_forward_hook(self._keep_backbone_output)  # type: ignore[union-attr]

    def _keep_backbone_output(self, module: torch.nn.Module, inputs: object, output: Any) -> None:
        """(1, 72×72, 1024) tokens → (1024, 72, 72), laid out as SAM 3's vision model hands them to its necks."""
        hidden = output.last_hidden_state
        side = int(round(hidden.shape[1] ** 0.5))
        self._backbone_output = hidden[0].view(side, side, -1).permute(2, 0, 1)

    @property
    def identity(self) -> str:
        return self._identity

    def encode(self, image: np.ndarray) -> ImageEmbedding:
        (embedding,) = self.encode_batch([image])
        return embedding

    def encode_batch(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        """One image per encoder pass: on a CPU a pass already keeps every core busy."""
        check_rgb_images(images)
        return [self._encode_one(image) for image in images]

    def _encode_one(self, image: np.ndarray) -> ImageEmbedding:
        inputs = self.processor.image_processor(images=[image], return_tensors="pt")  # type: ignore[attr-defined]
        pixels = inputs["pixel_values"].to(self.device)
        with self._encode_lock, torch.inference_mode():
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self._encoder_autocast):
                output = self.model.get_image_embeddings(pixels)  # type: ignore[operator]
            arrays = {name: value[0].float().cpu().numpy() for name, value in self.family.split(output).items()}
            if self._backbone_output is not None:
                arrays[SAM3_BACKBONE] = self._backbone_output.float().cpu().numpy()
                self._backbone_output = None
        features = arrays.pop("features")
        # SAM 2's processor stretches the image to its square input (and reports the original size as the
        # reshaped one); SAM-HQ's resizes the longest side and pads, reporting the size before padding.
        resized = inputs["reshaped_input_sizes"][0] if self.family.padded else pixels.shape[-2:]
        reshaped = tuple(int(side) for side in resized)
        return ImageEmbedding(
            features=features,
            original_size=(image.shape[0], image.shape[1]),
            input_size=(reshaped[0], reshaped[1]),
            extras=arrays,
        )

    def decode(self, embedding: ImageEmbedding, prompts: list[SegmentPrompt]) -> list[MaskPrediction]:
        """Prompts of one shape (point count, box, mask) are decoded together, in chunks, keeping their order."""
        groups: dict[tuple[int, bool, bool], list[int]] = defaultdict(list)
        for index, prompt in enumerate(prompts):
            groups[(len(prompt.points), prompt.box is not None, prompt.mask_logits is not None)].append(index)
        results: dict[int, MaskPrediction] = {}
        for indices in groups.values():
            for first in range(0, len(indices), DECODE_CHUNK):
                chunk = indices[first : first + DECODE_CHUNK]
                results.update(zip(chunk, self._decode_alike(embedding, [prompts[i] for i in chunk]), strict=True))
        return [results[index] for index in range(len(prompts))]

    def _decode_alike(self, embedding: ImageEmbedding, prompts: list[SegmentPrompt]) -> list[MaskPrediction]:
        """Prompts of one shape, decoded together against the one image."""
        count = len(prompts)
        decoded = {name: value for name, value in embedding.extras.items() if name != SAM3_BACKBONE}
        image = {"features": embedding.features, **decoded}
        scale = np.array(
            [embedding.input_size[1] / embedding.original_size[1], embedding.input_size[0] / embedding.original_size[0]]
        )
        first = prompts[0]
        inputs: dict[str, np.ndarray] = {}
        if first.points:
            points = np.array([prompt.points for prompt in prompts], dtype=np.float64) * scale
            inputs["input_points"] = points[:, None].astype(np.float32)
            inputs["input_labels"] = np.array([prompt.point_labels for prompt in prompts], dtype=np.int64)[:, None]
        if first.box is not None:
            boxes = np.array([prompt.box for prompt in prompts], dtype=np.float64) * np.tile(scale, 2)
            inputs["input_boxes"] = boxes[:, None].astype(np.float32)
        if first.mask_logits is not None:
            logits = np.stack([np.asarray(prompt.mask_logits, dtype=np.float32) for prompt in prompts])
            inputs["input_masks"] = logits[:, None]
        # As SAM's predictors do: one click is ambiguous (part, object, group), so pick the best of three masks.
        multimask = len(first.points) == 1 and first.box is None and first.mask_logits is None
        scores, all_low_res = self.decoder.run(image, inputs, multimask)
        best = scores.argmax(axis=1)
        rows = np.arange(count)
        low_res = all_low_res[rows, best]  # (count, 256, 256); SAM 3's (count, 288, 288)
        masks = self._upscale(torch.from_numpy(low_res), embedding)
        return [
            MaskPrediction(mask=masks[row] > 0.0, score=float(scores[row, best[row]]), low_res_logits=low_res[row])
            for row in range(count)
        ]

    def _upscale(self, low_res: torch.Tensor, embedding: ImageEmbedding) -> np.ndarray:
        """The library's own post-processing of low-resolution logits to the original image, unthresholded."""
        post_process: Callable[..., list[torch.Tensor]] = self.processor.post_process_masks  # type: ignore[attr-defined]
        sizes = [list(embedding.original_size)]
        if self.family.padded:
            (masks,) = post_process([low_res[None]], sizes, [list(embedding.input_size)], binarize=False)
        else:
            (masks,) = post_process([low_res[None]], sizes, binarize=False)
        return masks[0].numpy()
