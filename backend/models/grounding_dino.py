"""GroundingDINO through groundingdino-py 0.4.0 and its official checkpoint: loading, and one forward pass over a
batch of images scoring every query box against the caption's tokens (the selection is `detector.select`'s).

groundingdino-py was written against transformers 4: its `BertModelWarper` takes a `BertModel` apart and calls
methods and arguments that transformers 5 removed. `BertEncoderForGroundingDino` restores exactly those, and
`load_grounding_dino` has the package build its text encoder with it."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


@functools.cache
def bert_for_grounding_dino() -> Any:
    """`BertEncoderForGroundingDino`, built on first use so that importing this module does not import
    transformers."""
    from transformers import BertModel
    from transformers.models.bert.modeling_bert import BertEmbeddings, BertEncoder

    class EmbeddingsTakingPastLength(BertEmbeddings):
        """transformers 5 renamed the embeddings' `past_key_values_length` to `cache_length`."""

        def forward(
            self,
            input_ids: torch.LongTensor | None = None,
            token_type_ids: torch.LongTensor | None = None,
            position_ids: torch.LongTensor | None = None,
            inputs_embeds: torch.Tensor | None = None,
            past_key_values_length: int = 0,
        ) -> torch.Tensor:
            return super().forward(
                input_ids=input_ids,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                cache_length=past_key_values_length,
            )

    class EncoderTakingV4Arguments(BertEncoder):
        """transformers 4's encoder arguments: GroundingDINO passes no head mask, no cache and no output flags
        that change its result (it reads only `last_hidden_state`), so they are checked and dropped."""

        def forward(
            self,
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            head_mask: list[None] | None = None,
            encoder_hidden_states: torch.Tensor | None = None,
            encoder_attention_mask: torch.Tensor | None = None,
            past_key_values: object = None,
            use_cache: bool | None = None,
            **flags: object,
        ) -> Any:
            if past_key_values is not None or (head_mask is not None and any(m is not None for m in head_mask)):
                raise ValueError("GroundingDINO's text encoder runs without a cache or head mask")
            return super().forward(
                hidden_states,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                use_cache=False,
            )

    class BertEncoderForGroundingDino(BertModel):
        """A `BertModel` that groundingdino-py 0.4.0's `BertModelWarper` can drive under transformers 5.

        The warper copies `get_extended_attention_mask`, `invert_attention_mask` and `get_head_mask` off the
        model, which transformers 5 removed from `PreTrainedModel` (masks are built inside `forward` there), and it
        calls the embeddings with `past_key_values_length` and the encoder with transformers 4's arguments. Those
        three methods are restored as transformers 4.57 defined them (an additive mask broadcast over the heads:
        0 where attended, the dtype's minimum elsewhere; GroundingDINO's own 3-D mask keeps tokens of different
        phrases apart), and the two modules take the old arguments. The parameters are BertModel's, so the
        official BERT weights and GroundingDINO checkpoints load unchanged."""

        def __init__(self, config: Any, add_pooling_layer: bool = True) -> None:
            super().__init__(config, add_pooling_layer)
            # Subclasses without state of their own: the modules keep their parameters (and so their names).
            self.embeddings.__class__ = EmbeddingsTakingPastLength
            self.encoder.__class__ = EncoderTakingV4Arguments

        def get_extended_attention_mask(
            self, attention_mask: torch.Tensor, input_shape: object = None, device: object = None
        ) -> torch.Tensor:
            if attention_mask.dim() == 3:  # (batch, from, to): a mask per query token
                extended = attention_mask[:, None, :, :]
            elif attention_mask.dim() == 2:  # (batch, to)
                extended = attention_mask[:, None, None, :]
            else:
                raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)}: expected 2 or 3 dimensions")
            extended = extended.to(dtype=self.dtype)
            return (1.0 - extended) * torch.finfo(self.dtype).min

        def invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
            return self.get_extended_attention_mask(encoder_attention_mask)

        def get_head_mask(self, head_mask: None, num_hidden_layers: int) -> list[None]:
            if head_mask is not None:
                raise ValueError("GroundingDINO's text encoder runs without a head mask")
            return [None] * num_hidden_layers

    return BertEncoderForGroundingDino


def build_grounding_dino(args: object) -> GroundingDINO:
    """groundingdino-py's `build_model(args)`, its text encoder a `BertEncoderForGroundingDino` read from the local
    folder `args.text_encoder_type` (the package's own loader would build a plain `BertModel`)."""
    from groundingdino.models import build_model
    from groundingdino.util import get_tokenlizer

    def pretrained_language_model(folder: str) -> torch.nn.Module:
        if not Path(folder).is_dir():
            raise WrongCheckpoint(f"GroundingDINO's text encoder must be a local BERT folder, not {folder!r}")
        return bert_for_grounding_dino().from_pretrained(folder, local_files_only=True)

    get_tokenlizer.get_pretrained_language_model = pretrained_language_model
    with contextlib.redirect_stdout(sys.stderr):  # the package prints its text encoder's name
        return build_model(args)


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
    from groundingdino.util.slconfig import SLConfig

    args = SLConfig.fromfile(str(config))
    args.text_encoder_type = str(text_encoder)
    target = resolve_device(device)
    args.device = target.type
    # Activation checkpointing only saves memory when training; at inference it costs time.
    args.use_checkpoint = False
    args.use_transformer_ckpt = False
    model = build_grounding_dino(args)
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

    def score(
        self, images: list[np.ndarray], caption: str, spans: list[tuple[int, int]], floor: float
    ) -> list[BoxScores]:
        outputs = self.model(
            self._batch([self.pixels(image).to(self.device) for image in images]), captions=[caption] * len(images)
        )
        return [
            BoxScores(logits.float(), normalised_to_pixels(boxes.float(), image.shape[:2]))
            for image, logits, boxes in zip(images, outputs["pred_logits"], outputs["pred_boxes"], strict=True)
        ]
