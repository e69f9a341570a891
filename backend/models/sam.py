"""Segment Anything (Meta's segment-anything package) behind the `Segmenter` interface.

Loads Meta's official `.pth` state dicts. The image-encoder architecture is read off the checkpoint's
tensor shapes, so the official ViT-B/L/H files and reduced test builds go through the same loader. A file of
another official type than `SAM_MODEL_TYPE` is refused rather than served: the type names the `model_version`
Label Studio stores with every prediction (and skips tasks by), fixed at start-up before any file is read, so
serving the file's type under the setting's name would label predictions with a model that did not make them.
The common wrong files (GroundingDINO's, SAM 2's, a Hugging Face folder, a truncated download) are named.
"""

from __future__ import annotations

import copy
import io
import logging
import pickle
import threading
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from segment_anything.build_sam import _build_sam
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from backend.errors import WrongCheckpoint
from backend.models.base import ImageEmbedding, MaskPrediction, SegmentPrompt, check_rgb_images
from backend.models.checkpoints import GROUNDING_DINO_CHECKPOINT, SAM_CHECKPOINTS, sha256_of
from backend.models.sam_decoder import PromptDecoder, make_decoder

log = logging.getLogger(__name__)

IMAGE_SIZE = 1024
PATCH_SIZE = 16
LOW_RES_SIZE = 256
# The parts fine-tuning changes; their keys are those of Meta's checkpoints.
DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")


@dataclass(frozen=True)
class EncoderShape:
    """What varies between SAM image encoders."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]


OFFICIAL_ENCODERS = {
    "vit_b": EncoderShape(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": EncoderShape(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": EncoderShape(1280, 32, 16, (7, 15, 23, 31)),
}


def infer_encoder_shape(state_dict: dict[str, torch.Tensor]) -> EncoderShape:
    """Read the encoder's size from tensor shapes: windowed blocks have 2*14-1 relative positions."""
    embed_dim = state_dict["image_encoder.patch_embed.proj.weight"].shape[0]
    block_ids = sorted({int(key.split(".")[2]) for key in state_dict if key.startswith("image_encoder.blocks.")})
    global_blocks = []
    head_dim = None
    for block in block_ids:
        rel_pos = state_dict[f"image_encoder.blocks.{block}.attn.rel_pos_h"]
        head_dim = rel_pos.shape[1]
        if rel_pos.shape[0] != 2 * 14 - 1:
            global_blocks.append(block)
    if head_dim is None:
        raise ValueError("checkpoint holds no image-encoder blocks")
    return EncoderShape(embed_dim, len(block_ids), embed_dim // head_dim, tuple(global_blocks))


def decoder_state(sam: Sam) -> dict[str, torch.Tensor]:
    """The prompt encoder and mask decoder weights, on the CPU, under the official checkpoint's key names."""
    return {
        key: value.detach().cpu().clone() for key, value in sam.state_dict().items() if key.startswith(DECODER_PREFIXES)
    }


def decoder_weights(sam: Sam) -> bytes:
    """`decoder_state` serialised: what a fine-tuned version stores."""
    return serialize_decoder_state(decoder_state(sam))


def serialize_decoder_state(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_decoder_weights(weights: bytes) -> dict[str, torch.Tensor]:
    """The state `decoder_weights` wrote; ValueError for bytes that hold none."""
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    except Exception as error:  # bytes with the right checksum that torch cannot read: written wrong
        raise ValueError(f"the decoder weights do not load: {error}") from error
    if not isinstance(state, dict):
        raise ValueError("the decoder weights hold no state dict")
    return state


def with_decoder_state(sam: Sam, state: dict[str, torch.Tensor] | None = None) -> Sam:
    """A Sam that shares `sam`'s image encoder (frozen, so cached embeddings stay valid) and owns a copy of its
    prompt encoder and mask decoder, loaded from `state` when given."""
    tuned = Sam(
        image_encoder=sam.image_encoder,
        prompt_encoder=copy.deepcopy(sam.prompt_encoder),
        mask_decoder=copy.deepcopy(sam.mask_decoder),
        pixel_mean=sam.pixel_mean.flatten().tolist(),
        pixel_std=sam.pixel_std.flatten().tolist(),
    ).to(sam.device)
    if state is not None:
        expected = {key for key in tuned.state_dict() if key.startswith(DECODER_PREFIXES)}
        if set(state) != expected:
            raise ValueError(f"decoder weights hold {len(state)} tensors that do not match this SAM's {len(expected)}")
        try:
            tuned.load_state_dict(state, strict=False)
        except RuntimeError as error:  # tensor shapes of another SAM
            raise ValueError(f"decoder weights do not fit this SAM: {error}") from error
    return tuned


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# Key prefixes that give away another model's checkpoint.
GROUNDING_DINO_KEYS = ("backbone.0.", "transformer.", "bert.", "feat_map.", "input_proj.")
SAM2_KEYS = ("image_encoder.trunk.", "memory_encoder.", "memory_attention.", "sam_mask_decoder.")
SAM_ENCODER_KEY = "image_encoder.patch_embed.proj.weight"


def read_sam_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Meta's plain state dict in `checkpoint`; WrongCheckpoint saying what the file is when it holds none."""
    where = f"SAM_CHECKPOINT={checkpoint}"
    official = SAM_CHECKPOINTS["vit_b"]
    if checkpoint.is_dir():
        kind = "a Hugging Face model folder (config.json)" if (checkpoint / "config.json").is_file() else "a folder"
        raise WrongCheckpoint(
            f"{where} is {kind}; SAM_CHECKPOINT takes Meta's single .pth file, e.g. {official.filename} "
            f"from {official.url}"
        )
    try:
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not zipfile.is_zipfile(checkpoint):
            raise WrongCheckpoint(f"{where} is not a PyTorch checkpoint ({error.__class__.__name__})") from error
        if sha256_of(checkpoint) == GROUNDING_DINO_CHECKPOINT.sha256:
            raise WrongCheckpoint(
                f"{where} is the official GroundingDINO checkpoint; set it as GROUNDING_DINO_CHECKPOINT and point "
                "SAM_CHECKPOINT at a SAM file"
            ) from error
        raise WrongCheckpoint(
            f"{where} pickles objects besides tensors; Meta's SAM files are plain state dicts"
        ) from error
    except (RuntimeError, EOFError) as error:  # torch's reader on a cut-off zip archive or an empty file
        raise WrongCheckpoint(
            f"{where} is truncated or damaged ({checkpoint.stat().st_size} bytes; the official SAM files are "
            f"{official.size_mb} MB and more): download it again"
        ) from error
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise WrongCheckpoint(f"{where} holds no state dict")
    keys = [str(key).removeprefix("module.") for key in state]
    if any(key.startswith(GROUNDING_DINO_KEYS) for key in keys):
        raise WrongCheckpoint(
            f"{where} is a GroundingDINO checkpoint; set it as GROUNDING_DINO_CHECKPOINT and point SAM_CHECKPOINT "
            f"at a SAM file such as {official.filename}"
        )
    if any(key.startswith(SAM2_KEYS) for key in keys):
        raise WrongCheckpoint(
            f"{where} is a SAM 2 checkpoint, which this backend does not run; use a SAM (1) file such as "
            f"{official.filename}"
        )
    if SAM_ENCODER_KEY not in state:
        raise WrongCheckpoint(f"{where} holds no SAM image encoder ({len(keys)} tensors, e.g. {keys[:3]})")
    return state


def official_type(shape: EncoderShape) -> str | None:
    """vit_b, vit_l or vit_h when `shape` is one of Meta's encoders."""
    return next((name for name, known in OFFICIAL_ENCODERS.items() if known == shape), None)


def load_sam(
    checkpoint: Path, model_type: str = "", device: str = "auto", decoder_runtime: str = "auto", encoder_batch: int = 0
) -> SamSegmenter:
    """Build SAM from an official-format state dict; a file of another official type than `model_type` is
    refused (WrongCheckpoint), one of no official type (a reduced build) is served with a warning."""
    if model_type and model_type not in OFFICIAL_ENCODERS:
        raise ValueError(f"unknown SAM_MODEL_TYPE {model_type!r}; use one of {sorted(OFFICIAL_ENCODERS)}")
    state_dict = read_sam_state_dict(checkpoint)
    shape = infer_encoder_shape(state_dict)
    holds = official_type(shape)
    if model_type and holds is not None and holds != model_type:
        raise WrongCheckpoint(
            f"SAM_MODEL_TYPE={model_type} but SAM_CHECKPOINT={checkpoint} holds SAM {holds}; set "
            f"SAM_MODEL_TYPE={holds} (it names the model_version Label Studio stores) or point SAM_CHECKPOINT at "
            f"the {model_type} file ({SAM_CHECKPOINTS[model_type].filename})"
        )
    if model_type and holds is None:
        log.warning(
            "%s holds a SAM encoder of no official type (%s); it is served and reported as SAM_MODEL_TYPE=%s",
            checkpoint,
            shape,
            model_type,
        )
    sam = _build_sam(shape.embed_dim, shape.depth, shape.num_heads, list(shape.global_attn_indexes))
    sam.load_state_dict(state_dict)
    identity = f"sam-{shape.embed_dim}x{shape.depth}-{sha256_of(checkpoint)[:16]}"
    log.info("loaded SAM %s from %s", identity, checkpoint)
    return SamSegmenter(sam, identity, resolve_device(device), decoder_runtime, encoder_batch=encoder_batch)


AUTO_GPU_ENCODER_BATCH = 4


class SamSegmenter:
    """SAM's image encoder and prompt decoder, safe to call from many threads at once."""

    def __init__(
        self,
        sam: Sam,
        identity: str,
        device: torch.device,
        decoder_runtime: str = "auto",
        encode_lock: threading.Lock | None = None,
        encoder_batch: int = 0,
    ) -> None:
        self.sam = sam.to(device).eval()
        self.decoder: PromptDecoder = make_decoder(self.sam, device, decoder_runtime)
        self.device = device
        self.decoder_runtime = decoder_runtime
        self._identity = identity
        self._resize = ResizeLongestSide(IMAGE_SIZE)
        # One encoder pass at a time: concurrent passes only split the same cores and all finish late.
        self._encode_lock = encode_lock or threading.Lock()
        # Half precision only where the hardware is built for it; on CPU it is slower.
        self._encoder_autocast = device.type == "cuda"
        # Images per encoder pass (0: automatic). A GPU gains from stacking images; a CPU is already busy with
        # one, and ViT-B's activations for 4 images at once took 11 GB there (two workers went out of memory).
        self.encoder_batch = encoder_batch or (AUTO_GPU_ENCODER_BATCH if device.type == "cuda" else 1)

    @property
    def identity(self) -> str:
        return self._identity

    def with_decoder_state(self, state: dict[str, torch.Tensor]) -> SamSegmenter:
        """This segmenter with fine-tuned prompt-encoder and mask-decoder weights: the image encoder, its lock
        and its identity are shared, so embeddings cached for this one serve the variant too."""
        tuned = with_decoder_state(self.sam, state)
        return SamSegmenter(
            tuned, self._identity, self.device, self.decoder_runtime, self._encode_lock, self.encoder_batch
        )

    def with_decoder_weights(self, weights: bytes) -> SamSegmenter:
        """`with_decoder_state` from a version's stored weights; ValueError if they do not fit this SAM."""
        return self.with_decoder_state(load_decoder_weights(weights))

    def encode(self, image: np.ndarray) -> ImageEmbedding:
        (embedding,) = self.encode_batch([image])
        return embedding

    def encode_batch(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        """Encoder passes of up to `encoder_batch` images each: every image is resized and padded to the
        encoder's square input, so images of any sizes stack into one batch."""
        check_rgb_images(images)
        step = max(self.encoder_batch, 1)
        return [
            embedding
            for first in range(0, len(images), step)
            for embedding in self._encode_pass(images[first : first + step])
        ]

    def _encode_pass(self, images: list[np.ndarray]) -> list[ImageEmbedding]:
        resized = [self._resize.apply_image(image) for image in images]
        with self._encode_lock, torch.inference_mode():
            pixels = torch.cat(
                [
                    self.sam.preprocess(torch.as_tensor(each, device=self.device).permute(2, 0, 1)[None].float())
                    for each in resized
                ]
            )
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self._encoder_autocast):
                features = self.sam.image_encoder(pixels).float().cpu().numpy()
        return [
            ImageEmbedding(
                features=features[index],
                original_size=(image.shape[0], image.shape[1]),
                input_size=(each.shape[0], each.shape[1]),
            )
            for index, (image, each) in enumerate(zip(images, resized, strict=True))
        ]

    def decode(self, embedding: ImageEmbedding, prompts: list[SegmentPrompt]) -> list[MaskPrediction]:
        """Decode prompts in as few batched calls as their shapes allow, keeping their order."""
        inputs = [self._prompt_arrays(prompt, embedding.original_size) for prompt in prompts]
        # SAM's ONNX wrapper picks multimask-or-single from the point count, so a batch shares one count.
        batches: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for index, (coords, _, logits) in enumerate(inputs):
            batches[(len(coords), logits is not None)].append(index)
        features = np.ascontiguousarray(embedding.features, dtype=np.float32)[None]
        image_size = np.array(embedding.original_size, dtype=np.float32)
        results: list[MaskPrediction | None] = [None] * len(prompts)
        for (_, has_mask), indices in batches.items():
            coords = np.stack([inputs[i][0] for i in indices])
            labels = np.stack([inputs[i][1] for i in indices])
            if has_mask:  # every prompt of this batch has its logits
                mask_input = np.stack([logits for i in indices if (logits := inputs[i][2]) is not None])
                mask_input = mask_input.astype(np.float32)[:, None]
            else:
                mask_input = np.zeros((len(indices), 1, LOW_RES_SIZE, LOW_RES_SIZE), dtype=np.float32)
            has_mask_input = np.array([float(has_mask)], dtype=np.float32)
            masks, scores, low_res = self.decoder.run(features, coords, labels, mask_input, has_mask_input, image_size)
            for row, index in enumerate(indices):
                results[index] = MaskPrediction(
                    mask=masks[row, 0] > self.sam.mask_threshold,
                    score=float(scores[row, 0]),
                    low_res_logits=low_res[row, 0],
                )
        return [result for result in results if result is not None]

    def _prompt_arrays(
        self, prompt: SegmentPrompt, original_size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """SAM's ONNX prompt convention: box corners are points labelled 2 and 3; without a box a
        padding point labelled -1 is appended, as SamPredictor does."""
        coords = [list(point) for point in prompt.points]
        labels = [float(label) for label in prompt.point_labels]
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box
            coords += [[x0, y0], [x1, y1]]
            labels += [2.0, 3.0]
        else:
            coords.append([0.0, 0.0])
            labels.append(-1.0)
        scaled = self._resize.apply_coords(np.array(coords, dtype=np.float32), original_size).astype(np.float32)
        return scaled, np.array(labels, dtype=np.float32), prompt.mask_logits
