"""Official checkpoints: where to download them, how to verify them, and how to tell a missing one.

The download goes to a temporary file that is renamed only once its SHA-256 matches, so a half
downloaded or corrupted checkpoint is never loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import requests

from backend.errors import CheckpointMissing

log = logging.getLogger(__name__)

WEIGHTS_COMMAND = "python -m backend weights download"


def missing_checkpoint(what: str, path: Path) -> CheckpointMissing:
    """The error for an absent checkpoint: it names the file and the command that fetches it."""
    return CheckpointMissing(
        f"{what} checkpoint not found at {path}. Download the official weights with "
        f"`{WEIGHTS_COMMAND}` or point the setting at an existing file."
    )


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One published checkpoint file."""

    filename: str
    url: str
    sha256: str
    size_mb: int


SAM_CHECKPOINTS: dict[str, OfficialCheckpoint] = {
    "vit_b": OfficialCheckpoint(
        "sam_vit_b_01ec64.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375,
    ),
    "vit_l": OfficialCheckpoint(
        "sam_vit_l_0b3195.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1250,
    ),
    "vit_h": OfficialCheckpoint(
        "sam_vit_h_4b8939.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2560,
    ),
}

# The SwinT OGC model that GROUNDING_DINO_CONFIG's default (the package's GroundingDINO_SwinT_OGC.py) describes.
GROUNDING_DINO_CHECKPOINT = OfficialCheckpoint(
    "groundingdino_swint_ogc.pth",
    "https://github.com/IDEA-Research/GroundingDINO/releases/download/v0.1.0-alpha/groundingdino_swint_ogc.pth",
    "3b3ca2563c77c69f651d7bd133e97139c186df06231157a64c507099c52bc799",
    694,
)


def sha256_of(path: Path, chunk_bytes: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def download_checkpoint(checkpoint: OfficialCheckpoint, directory: Path, timeout_s: float = 60.0) -> Path:
    """Download `checkpoint` into `directory` unless a verified copy is already there."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / checkpoint.filename
    if target.exists():
        if sha256_of(target) == checkpoint.sha256:
            log.info("%s already present and verified", target)
            return target
        log.warning("%s has the wrong checksum; downloading it again", target)
    log.info("downloading %s (%d MB) from %s", checkpoint.filename, checkpoint.size_mb, checkpoint.url)
    digest = hashlib.sha256()
    handle, partial_name = tempfile.mkstemp(dir=directory, prefix=checkpoint.filename, suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, requests.get(checkpoint.url, stream=True, timeout=timeout_s) as response:
            response.raise_for_status()
            for chunk in response.iter_content(chunk_size=1024 * 1024):
                out.write(chunk)
                digest.update(chunk)
        if digest.hexdigest() != checkpoint.sha256:
            raise ValueError(
                f"checksum mismatch for {checkpoint.url}: got {digest.hexdigest()}, expected {checkpoint.sha256}"
            )
        os.replace(partial_name, target)
    finally:
        if os.path.exists(partial_name):
            os.unlink(partial_name)
    return target


def download_text_encoder(name: str) -> str:
    """Fetch a Hugging Face text encoder (config, vocabulary, weights) into the Hugging Face cache so that
    GroundingDINO loads it offline later; a local folder is returned as it is."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(
        name, allow_patterns=["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "*.safetensors"]
    )
