"""GroundingDINO through groundingdino-py 0.4.0 and its official checkpoint: loading, and one forward pass over a
batch of images scoring every query box against the caption's tokens (the selection is `detector.select`'s)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from backend.errors import WrongCheckpoint
from backend.models.checkpoints import GROUNDING_DINO_CHECKPOINT, sha256_of
from backend.models.detector import BoxScores, Detector, normalised_to_pixels, tokens_of_phrases
from backend.models.sam import resolve_device

if TYPE_CHECKING:
    # Untyped (Any to the checker), but the model class, with the tokenizer and max_text_len a Module lacks.
    from groundingdino.models.GroundingDINO.groundingdino import GroundingDINO

log = logging.getLogger(__name__)

# The long side limit GroundingDINO was trained with for its 800-pixel short side.
MAX_SIZE_PER_SHORT_SIDE = 1333 / 800


def packaged_config(name: str = "GroundingDINO_SwinT_OGC.py") -> Path:
    """A model config shipped inside groundingdino-py."""
    import groundingdino

    return Path(groundingdino.__file__).parent / "config" / name


def _read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The official file is `{"model": state_dict}`; a file that also pickles training objects is only
    unpickled in full when it is byte for byte the published checkpoint."""
    try:
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if sha256_of(checkpoint) != GROUNDING_DINO_CHECKPOINT.sha256:
            raise
        data = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{checkpoint} holds no GroundingDINO state dict (expected {{'model': state_dict}})")
    # Checkpoints saved from DistributedDataParallel prefix every key.
    return {key.removeprefix("module."): value for key, value in state.items()}


def _text_encoder_name_to_the_log() -> None:
    """groundingdino-py prints its text encoder's name on stdout as it loads: at DEBUG in the log instead."""
    from groundingdino.util import get_tokenlizer

    library_log = logging.getLogger("groundingdino")
    get_tokenlizer.print = lambda *parts, **_: library_log.debug(" ".join(map(str, parts)))


def load_grounding_dino(
    checkpoint: Path,
    config: Path | None,
    text_encoder: Path,
    device: str = "auto",
    image_size: int = 800,
) -> GroundingDino:
    """Build the model described by `config` (default: the packaged SwinT OGC) and load the official-format
    `checkpoint`; `text_encoder` is a local folder holding the BERT's config, vocabulary and weights (never a hub
    name: nothing is downloaded here)."""
    _text_encoder_name_to_the_log()
    config = config or packaged_config()
    if not config.is_file():
        raise FileNotFoundError(f"GroundingDINO config {config} does not exist (GROUNDING_DINO_CONFIG)")
    if not (text_encoder / "config.json").is_file():
        raise WrongCheckpoint(
            f"GROUNDING_DINO_TEXT_ENCODER={text_encoder} is not a folder holding a Hugging Face BERT (config.json, "
            "vocab.txt, weights)"
        )
    from groundingdino.models import build_model
    from groundingdino.util.slconfig import SLConfig

    args = SLConfig.fromfile(str(config))
    args.text_encoder_type = str(text_encoder)
    target = resolve_device(device)
    args.device = target.type
    # Activation checkpointing only saves memory when training; at inference it costs time.
    args.use_checkpoint = False
    args.use_transformer_ckpt = False
    with contextlib.redirect_stdout(sys.stderr):  # the package prints its text encoder's name
        model = build_model(args)
    missing, unexpected = model.load_state_dict(_read_state_dict(checkpoint), strict=False)
    # The text encoder's pretrained weights stand in for BERT tensors a checkpoint may leave out.
    missing = [key for key in missing if not key.startswith("bert.")]
    if missing:
        raise ValueError(
            f"{checkpoint} does not match the GroundingDINO config {config.name}: "
            f"{len(missing)} tensors missing, e.g. {missing[:3]}"
        )
    if unexpected:
        log.info("ignored %d tensors of %s that the model does not use", len(unexpected), checkpoint)
    # What the boxes depend on besides the image and the query: cached detections are keyed by it.
    made_of = [sha256_of(checkpoint), hashlib.sha256(config.read_bytes()).hexdigest(), text_encoder, image_size]
    identity = "gdino-" + hashlib.sha256(repr(made_of).encode()).hexdigest()[:16]
    log.info(
        "loaded GroundingDINO %s from %s (config %s, text encoder %s)", identity, checkpoint, config.name, text_encoder
    )
    return GroundingDino(model, target, identity, image_size)


class GroundingDino(Detector):
    """groundingdino-py's model: images resized as its `load_image` does, one padded batch a pass."""

    name = "GroundingDINO"

    def __init__(self, model: GroundingDINO, device: torch.device, identity: str, image_size: int = 800) -> None:
        super().__init__()
        import groundingdino.datasets.transforms as transforms
        from groundingdino.util.misc import nested_tensor_from_tensor_list

        self._batch = nested_tensor_from_tensor_list  # pads images of different sizes and masks the padding

        self.model = model.to(device).eval()
        self.device = device
        self.identity = identity
        self.tokenizer = model.tokenizer
        self.max_text_tokens = model.max_text_len
        self._transform = transforms.Compose(
            [
                transforms.RandomResize([image_size], max_size=round(image_size * MAX_SIZE_PER_SHORT_SIDE)),
                transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    def text_tokens(self, caption: str, spans: list[tuple[int, int]]) -> int:
        return len(self.tokenizer(caption)["input_ids"])

    def phrase_tokens(self, caption: str, spans: list[tuple[int, int]]) -> torch.Tensor:
        offsets = self.tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) > self.max_text_tokens:
            raise ValueError(f"the caption needs {len(offsets)} tokens; GroundingDINO reads {self.max_text_tokens}")
        return tokens_of_phrases(offsets, spans).to(self.device)

    def pixels(self, image: np.ndarray) -> torch.Tensor:
        """The normalised (3, h, w) tensor GroundingDINO reads for an RGB uint8 image."""
        return self._transform(Image.fromarray(image), None)[0]

    def score(self, images: list[np.ndarray], caption: str, spans: list[tuple[int, int]]) -> list[BoxScores]:
        outputs = self.model(
            self._batch([self.pixels(image).to(self.device) for image in images]), captions=[caption] * len(images)
        )
        return [
            BoxScores(logits.float(), normalised_to_pixels(boxes.float(), image.shape[:2]))
            for image, logits, boxes in zip(images, outputs["pred_logits"], outputs["pred_boxes"], strict=True)
        ]
