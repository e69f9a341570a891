"""The real Label Studio, started once for the end-to-end stage, and the backend's environment for it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.label_studio import LabelStudioApi, LabelStudioProcess, ensure_label_studio


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    started = time.perf_counter()
    executable = ensure_label_studio()
    installed = time.perf_counter() - started
    process = LabelStudioProcess(executable, tmp_path_factory.mktemp("label-studio")).start()
    print(f"\nLabel Studio: install/check {installed:.0f} s, first start {process.start_seconds:.0f} s")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def personal_access_token(label_studio) -> str:
    return LabelStudioApi(label_studio.url, label_studio.legacy_token).call("POST", "/api/token/")["token"]


def backend_environment(
    label_studio_url: str, api_key: str, sam_checkpoint: Path, grounding_dino_files, redis_url: str, model_dir: Path
) -> dict[str, str]:
    """The backend configured for the small test models: SAM and the small GroundingDINO the unit tests build,
    both in the official checkpoint formats, reading 128-pixel images for speed."""
    return {
        "LABEL_STUDIO_URL": label_studio_url,
        "LABEL_STUDIO_API_KEY": api_key,
        "SAM_CHECKPOINT": str(sam_checkpoint),
        "REDIS_URL": redis_url,
        "MODEL_DIR": str(model_dir),
        "TORCH_THREADS": "1",
        "GROUNDING_DINO_CONFIG": str(grounding_dino_files.config),
        "GROUNDING_DINO_CHECKPOINT": str(grounding_dino_files.checkpoint),
        "GROUNDING_DINO_TEXT_ENCODER": str(grounding_dino_files.text_encoder),
        "GROUNDING_DINO_IMAGE_SIZE": "128",
        # A task opened without a prediction waits for it, as these stages check it on screen and in what Label
        # Studio stores at the first open; tests/test_task_open.py tests the TASK_OPEN_WAIT answer.
        "TASK_OPEN_WAIT": "90",
    }


def sam3_environment(environment: dict[str, str], sam3_folder: Path, max_objects: int) -> dict[str, str]:
    """`environment` with SAM 3 (the folder `write_sam3` writes) as both the segmenter and the detector, thresholds
    at 0: random weights score every instance low, and these stages check the path through Label Studio."""
    return environment | {
        "SAM_CHECKPOINT": str(sam3_folder),
        "SAM_MODEL_TYPE": "sam3",
        "DETECTOR": "sam3",
        "DETECTOR_MODEL": str(sam3_folder),
        "BOX_THRESHOLD": "0",
        "TEXT_THRESHOLD": "0",
        "MAX_OBJECTS": str(max_objects),
    }
