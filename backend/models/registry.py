"""Which model a deployment runs, chosen by settings, as segment-anything's `sam_model_registry` does: the one place
that turns settings into loaded models. Adding a model means a loader in `backend.models` and a line here."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from backend.config import Settings
from backend.errors import CheckpointMissing
from backend.models.base import Segmenter
from backend.models.checkpoints import (
    BERT_BASE_UNCASED,
    DETECTOR_REPOSITORIES,
    GROUNDING_DINO_CHECKPOINT,
    MM_GROUNDING_DINO_REPOSITORY,
    SAM_CHECKPOINTS,
    TRANSFORMERS_MODELS,
    VIDEO_REPOSITORIES,
    CheckpointLocation,
    missing_checkpoint,
)
from backend.models.detector import Detector
from backend.models.grounding_dino import load_grounding_dino
from backend.models.hf_segmenter import load_hf_segmenter
from backend.models.sam import load_sam, resolve_device
from backend.models.sam3_detector import load_sam3_detector
from backend.models.transformers_detectors import load_transformers_detector
from backend.models.video_tracker import VideoTracker, load_video_tracker

# transformers builds BERT under init_empty_weights, which patches torch.nn.Module for every thread: a SAM
# built at that moment would get empty (meta) parameters. So models are built one at a time.
MODEL_BUILD_LOCK = threading.Lock()


def apply_torch_threads(threads: int) -> int:
    """Set torch's CPU threads for this process (0 keeps torch's default); the number it now runs with."""
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def sam_checkpoint(settings: Settings, model_type: str | None = None) -> CheckpointLocation:
    """SAM_CHECKPOINT, else the official file (SAM) or model folder (the transformers models) of `model_type`
    (default SAM_MODEL_TYPE) in WEIGHTS_DIR."""
    kind = model_type or settings.sam_model_type
    what = "SAM" if kind in SAM_CHECKPOINTS else kind
    if settings.sam_checkpoint:
        return CheckpointLocation(what, "SAM_CHECKPOINT", Path(settings.sam_checkpoint), None)
    if kind in TRANSFORMERS_MODELS:
        model = TRANSFORMERS_MODELS[kind]
        return CheckpointLocation(what, "SAM_CHECKPOINT", Path(settings.weights_dir) / model.name, model)
    official = SAM_CHECKPOINTS[kind]
    return CheckpointLocation(what, "SAM_CHECKPOINT", Path(settings.weights_dir) / official.filename, official)


def grounding_dino_checkpoint(settings: Settings) -> CheckpointLocation:
    """GROUNDING_DINO_CHECKPOINT, else the official file in WEIGHTS_DIR."""
    if settings.grounding_dino_checkpoint:
        path = Path(settings.grounding_dino_checkpoint)
        return CheckpointLocation("GroundingDINO", "GROUNDING_DINO_CHECKPOINT", path, None)
    path = Path(settings.weights_dir) / GROUNDING_DINO_CHECKPOINT.filename
    return CheckpointLocation("GroundingDINO", "GROUNDING_DINO_CHECKPOINT", path, GROUNDING_DINO_CHECKPOINT)


def text_encoder(settings: Settings) -> CheckpointLocation:
    """GROUNDING_DINO_TEXT_ENCODER as a local folder; its default name means the official BERT's folder in
    WEIGHTS_DIR, so no Hugging Face hub is ever contacted to resolve it."""
    if settings.grounding_dino_text_encoder == BERT_BASE_UNCASED.name:
        path = Path(settings.weights_dir) / BERT_BASE_UNCASED.name
        return CheckpointLocation("text encoder", "GROUNDING_DINO_TEXT_ENCODER", path, BERT_BASE_UNCASED)
    return CheckpointLocation(
        "text encoder", "GROUNDING_DINO_TEXT_ENCODER", Path(settings.grounding_dino_text_encoder), None
    )


def detector_model(settings: Settings) -> CheckpointLocation:
    """DETECTOR_MODEL, else the official repository's folder in WEIGHTS_DIR, for a transformers detector (SAM 3's is
    the folder SAM_MODEL_TYPE=sam3 reads too)."""
    what = {
        "grounding-dino": "GroundingDINO",
        "mm-grounding-dino": "MM-GroundingDINO",
        "owlv2": "OWLv2",
        "sam3": "SAM 3",
    }
    if settings.detector_model:
        return CheckpointLocation(what[settings.detector], "DETECTOR_MODEL", Path(settings.detector_model), None)
    official = DETECTOR_REPOSITORIES.get(settings.detector)
    if official is None:
        raise CheckpointMissing(
            f"DETECTOR={settings.detector} has no pinned official revision to fetch: set DETECTOR_MODEL to a folder "
            f"holding {MM_GROUNDING_DINO_REPOSITORY} (for example `hf download "
            f"{MM_GROUNDING_DINO_REPOSITORY} --revision <commit> --local-dir <folder>`)"
        )
    path = Path(settings.weights_dir) / official.name
    return CheckpointLocation(what[settings.detector], "DETECTOR_MODEL", path, official)


def shares_sam3_encoder(settings: Settings) -> bool:
    """DETECTOR=sam3 and SAM_MODEL_TYPE=sam3 on one folder: one image encoder (and one cached embedding) for both."""
    if settings.detector != "sam3" or settings.sam_model_type != "sam3":
        return False
    return sam_checkpoint(settings).path.resolve() == detector_model(settings).path.resolve()


def video_checkpoint(settings: Settings) -> CheckpointLocation:
    """VIDEO_CHECKPOINT, else the official folder of VIDEO_MODEL in WEIGHTS_DIR."""
    what = f"{settings.video_model} video predictor"
    if settings.video_checkpoint:
        return CheckpointLocation(what, "VIDEO_CHECKPOINT", Path(settings.video_checkpoint), None)
    official = VIDEO_REPOSITORIES[settings.video_model]
    return CheckpointLocation(what, "VIDEO_CHECKPOINT", Path(settings.weights_dir) / official.name, official)


# Which transformers video predictor reads each VIDEO_MODEL.
VIDEO_FAMILY_OF = {"edgetam": "edgetam_video", "sam3": "sam3_tracker_video"}


def load_video(settings: Settings) -> VideoTracker:
    """The configured VIDEO_MODEL."""
    with MODEL_BUILD_LOCK:
        quiet_transformers()
        family = VIDEO_FAMILY_OF.get(settings.video_model, "sam2_video")
        folder = present(video_checkpoint(settings))
        return load_video_tracker(folder, family, settings.video_model, resolve_device(settings.device))


def detector_weights(settings: Settings) -> list[CheckpointLocation]:
    """Every file or folder the configured DETECTOR reads."""
    if settings.detector == "groundingdino-py":
        return [grounding_dino_checkpoint(settings), text_encoder(settings)]
    return [detector_model(settings)]


def quiet_transformers() -> None:
    """transformers 5 draws a "Loading weights" progress bar on stderr at every `from_pretrained`: in a server's log
    that is a library's print between our lines, so it is switched off before a transformers model loads."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def present(location: CheckpointLocation) -> Path:
    """The location's path; CheckpointMissing naming the setting and the file when nothing is there."""
    if not location.path.exists():
        raise missing_checkpoint(location)
    return location.path


def load_segmenter(settings: Settings, decoder_runtime: str | None = None) -> Segmenter:
    """The configured segmenter; `decoder_runtime` overrides DECODER_RUNTIME (SAM's training needs the PyTorch
    decoder)."""
    kind = settings.sam_model_type
    with MODEL_BUILD_LOCK:
        if kind in TRANSFORMERS_MODELS:
            folder = present(sam_checkpoint(settings))
            quiet_transformers()
            return load_hf_segmenter(
                folder,
                TRANSFORMERS_MODELS[kind].model_type,
                kind,
                resolve_device(settings.device),
                decoder_runtime or settings.decoder_runtime,
                keep_backbone=shares_sam3_encoder(settings),
            )
        return load_sam(
            present(sam_checkpoint(settings)),
            settings.sam_model_type,
            settings.device,
            decoder_runtime or settings.decoder_runtime,
            settings.sam_encoder_batch,
        )


def load_detector(settings: Settings) -> Detector:
    """The configured DETECTOR."""
    with MODEL_BUILD_LOCK:
        quiet_transformers()  # groundingdino-py's text encoder is transformers' BERT
        if settings.detector == "groundingdino-py":
            return load_grounding_dino(
                present(grounding_dino_checkpoint(settings)),
                Path(settings.grounding_dino_config) if settings.grounding_dino_config else None,
                present(text_encoder(settings)),
                settings.device,
                settings.grounding_dino_image_size,
            )
        if settings.detector == "sam3":
            return load_sam3_detector(present(detector_model(settings)), settings.device, shares_sam3_encoder(settings))
        return load_transformers_detector(
            settings.detector,
            present(detector_model(settings)),
            settings.device,
            settings.grounding_dino_image_size,
        )
