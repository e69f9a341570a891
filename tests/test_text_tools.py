"""`python -m backend predict` and the Gradio demo page, run as users run them, sharing the backend's embedding
cache: an image segmented there is clicked in Label Studio without being encoded again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.assets import REPO, recorded
from tests.conftest import make_client
from tests.services import free_port


def backend_env(settings) -> dict[str, str]:
    """The environment that gives a `python -m backend` process these settings."""
    return {
        **os.environ,
        "SAM_CHECKPOINT": settings.sam_checkpoint,
        "GROUNDING_DINO_CONFIG": settings.grounding_dino_config,
        "GROUNDING_DINO_CHECKPOINT": settings.grounding_dino_checkpoint,
        "GROUNDING_DINO_TEXT_ENCODER": settings.grounding_dino_text_encoder,
        "GROUNDING_DINO_IMAGE_SIZE": str(settings.grounding_dino_image_size),
        "DETECTOR": settings.detector,
        "DETECTOR_MODEL": settings.detector_model,
        "MAX_OBJECTS": str(settings.max_objects),
        "REDIS_URL": settings.redis_url,
        "WEIGHTS_DIR": settings.weights_dir,
        "LOG_LEVEL": "WARNING",
        "GRADIO_ANALYTICS_ENABLED": "False",
    }


def click_on(settings, image_url: str):
    """An interactive click, as Label Studio sends it, on `image_url`, through the backend sharing the cache."""
    client, _ = make_client(settings)
    body = recorded("04-predict-interactive-keypoints.json")
    body["tasks"][0]["data"]["image"] = image_url
    return client.post("/predict", json=body)


def run_cli(settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend", "predict", *args],
        cwd=REPO,
        env=backend_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_prints_detections_draws_the_overlay_and_fills_the_shared_cache(grounded_settings, media_root, tmp_path):
    # A copy of its own (re-encoded, so a digest no other test's process can have cached meanwhile).
    photo = media_root / "upload/1/cli_voc.jpg"
    Image.open(media_root / "upload/1/voc.jpg").save(photo, quality=91)
    overlay_path = tmp_path / "overlay.png"
    done = run_cli(grounded_settings, str(photo), "--text", "car, wheel", "--out", str(overlay_path))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    original = np.asarray(Image.open(photo).convert("RGB"))
    assert (report["height"], report["width"]) == original.shape[:2]
    assert report["embedding_cache"] == "miss"
    assert 0 < len(report["objects"]) <= grounded_settings.max_objects
    for obj in report["objects"]:
        assert obj["label"] in ("car", "wheel") and 0.0 <= obj["score"] <= 1.0
        assert len(obj["box"]) == 4 and obj["mask_pixels"] >= 0
    overlay = np.asarray(Image.open(overlay_path))
    assert overlay.shape == original.shape and not np.array_equal(overlay, original)
    click = click_on(grounded_settings, "/data/upload/1/cli_voc.jpg")
    assert click.status_code == 200 and click.headers["X-Embedding-Cache"] == "hit"


def test_cli_predicts_with_another_detector_and_says_which_weights_one_lacks(
    grounded_settings, detector_folders, media_root
):
    owl = replace(grounded_settings, detector="owlv2", detector_model=str(detector_folders["owlv2"]))
    done = run_cli(owl, str(media_root / "upload/1/voc.jpg"), "--text", "car, wheel")
    assert done.returncode == 0, done.stderr
    objects = json.loads(done.stdout)["objects"]
    assert objects and {obj["label"] for obj in objects} <= {"car", "wheel"}
    # Another detector than the configured one reads its official folder in WEIGHTS_DIR, absent here.
    missing = run_cli(owl, str(media_root / "upload/1/voc.jpg"), "--text", "car", "--detector", "grounding-dino")
    assert missing.returncode == 1 and "DETECTOR=grounding-dino" in missing.stderr
    assert "grounding-dino-tiny" in missing.stderr and "DETECTOR_MODEL" in missing.stderr


def test_cli_refuses_a_prompt_of_separators(grounded_settings, media_root):
    done = run_cli(grounded_settings, str(media_root / "upload/1/voc.jpg"), "--text", " , ; ")
    assert done.returncode == 1 and "only separators" in done.stderr and done.stdout == ""


@pytest.fixture
def demo_url(grounded_settings, tmp_path):
    port = free_port()
    log = open(tmp_path / "demo.log", "w")  # noqa: SIM115  # closed below, after the process
    process = subprocess.Popen(
        [sys.executable, "-m", "backend", "demo", "--port", str(port)],
        cwd=REPO,
        env=backend_env(grounded_settings),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        assert process.poll() is None, (tmp_path / "demo.log").read_text()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_demo_segments_through_the_backend_and_shares_its_cache(demo_url, grounded_settings, media_root):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(demo_url, verbose=False)
    photo = media_root / "upload/1/arc2017.jpg"
    overlay_path, detections = client.predict(
        "vit_b", "groundingdino-py", 0.3, 0.25, handle_file(str(photo)), "car, wheel", api_name="/predict"
    )
    original = np.asarray(Image.open(photo).convert("RGB"))
    overlay = np.asarray(Image.open(overlay_path).convert("RGB"))
    assert overlay.shape == original.shape and not np.array_equal(overlay, original)
    assert detections["embedding_cache"] == "miss"
    assert detections["objects"] and {obj["label"] for obj in detections["objects"]} <= {"car", "wheel"}
    click = click_on(grounded_settings, "/data/upload/1/arc2017.jpg")
    assert click.status_code == 200 and click.headers["X-Embedding-Cache"] == "hit"
    # The same image again from the demo: its embedding is found, only GroundingDINO and the decoder run.
    _, again = client.predict(
        "vit_b", "groundingdino-py", 0.3, 0.25, handle_file(str(photo)), "wheel", api_name="/predict"
    )
    assert again["embedding_cache"] == "hit"
    with pytest.raises(AppError, match="only separators"):
        client.predict("vit_b", "groundingdino-py", 0.3, 0.25, handle_file(str(photo)), " . ", api_name="/predict")
    with pytest.raises(AppError, match="SAM weights not found"):
        client.predict("vit_h", "groundingdino-py", 0.3, 0.25, handle_file(str(photo)), "car", api_name="/predict")
    # Every detector is offered; one whose weights are absent says which folder it looked for.
    with pytest.raises(AppError, match="owlv2-base-patch16-ensemble"):
        client.predict("vit_b", "owlv2", 0.3, 0.25, handle_file(str(photo)), "car", api_name="/predict")


def test_demo_module_is_not_needed_by_the_backend():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, backend.wsgi; print('gradio' in sys.modules)"],
        cwd=REPO,
        env={**os.environ, "SAM_CHECKPOINT": str(Path("/nonexistent"))},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip().endswith("False")
