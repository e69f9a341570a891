"""Which model a deployment runs, chosen by settings, as segment-anything's `sam_model_registry` does: the one place
that turns settings into loaded models. Adding a model means a loader in `backend.models` and a line here."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from backend.config import Settings
from backend.models.checkpoints import GROUNDING_DINO_CHECKPOINT, SAM_CHECKPOINTS
from backend.models.grounding_dino import GroundingDino, load_grounding_dino
from backend.models.sam import SamSegmenter, load_sam

# transformers builds BERT under init_empty_weights, which patches torch.nn.Module for every thread: a SAM
# built at that moment would get empty (meta) parameters. So models are built one at a time.
MODEL_BUILD_LOCK = threading.Lock()


def apply_torch_threads(threads: int) -> int:
    """Set torch's CPU threads for this process (0 keeps torch's default); the number it now runs with."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def sam_checkpoint_path(settings: Settings) -> Path:
    """The SAM checkpoint to load: SAM_CHECKPOINT, else the official file name in WEIGHTS_DIR."""
    if settings.sam_checkpoint:
        return Path(settings.sam_checkpoint)
    return Path(settings.weights_dir) / SAM_CHECKPOINTS[settings.sam_model_type].filename


def grounding_dino_checkpoint_path(settings: Settings) -> Path:
    """GROUNDING_DINO_CHECKPOINT, else the official file name in WEIGHTS_DIR."""
    if settings.grounding_dino_checkpoint:
        return Path(settings.grounding_dino_checkpoint)
    return Path(settings.weights_dir) / GROUNDING_DINO_CHECKPOINT.filename


def load_segmenter(settings: Settings, decoder_runtime: str | None = None) -> SamSegmenter:
    """The configured SAM; `decoder_runtime` overrides DECODER_RUNTIME (training needs the PyTorch decoder)."""
    with MODEL_BUILD_LOCK:
        return load_sam(
            sam_checkpoint_path(settings),
            settings.sam_model_type,
            settings.device,
            decoder_runtime or settings.decoder_runtime,
            settings.sam_encoder_batch,
        )


def load_detector(settings: Settings) -> GroundingDino:
    """The configured GroundingDINO."""
    with MODEL_BUILD_LOCK:
        return load_grounding_dino(
            grounding_dino_checkpoint_path(settings),
            Path(settings.grounding_dino_config) if settings.grounding_dino_config else None,
            settings.grounding_dino_text_encoder,
            settings.device,
            settings.grounding_dino_image_size,
        )
