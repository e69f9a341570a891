"""The segmenters installed beside the configured one, for `python -m backend evaluate`: every SAM_MODEL_TYPE whose
official file or folder is in WEIGHTS_DIR, each loaded in its turn to encode the images itself."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from backend.config import SAM_TYPES, TRANSFORMERS_SEGMENTERS, Settings
from backend.models.base import Segmenter
from backend.models.registry import load_segmenter, sam_checkpoint


@dataclass(frozen=True)
class InstalledSegmenter:
    kind: str  # its SAM_MODEL_TYPE
    settings: Settings  # the deployment's, with SAM_MODEL_TYPE=kind and its official weights in WEIGHTS_DIR
    fingerprint: str  # its weights' files' names, sizes and modification times: their identity, read without loading

    @property
    def name(self) -> str:
        return f"sam-{self.kind}"

    def load(self) -> Segmenter:
        return load_segmenter(self.settings)


def weights_fingerprint(path: Path) -> str:
    files = sorted(entry for entry in path.rglob("*") if entry.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def installed_segmenters(settings: Settings) -> list[InstalledSegmenter]:
    """Every other SAM_MODEL_TYPE whose official weights are in WEIGHTS_DIR (SAM_CHECKPOINT names the configured
    model's own file, so it is not looked at here)."""
    official = replace(settings, sam_checkpoint="")
    found = []
    for kind in (*SAM_TYPES, *TRANSFORMERS_SEGMENTERS):
        path = sam_checkpoint(official, kind).path
        if kind != settings.sam_model_type and path.exists():
            found.append(InstalledSegmenter(kind, replace(official, sam_model_type=kind), weights_fingerprint(path)))
    return found
