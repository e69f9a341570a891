"""The Docker stage (`make docker`): both images built from the Dockerfiles, the compose stack started as the README
says (CPU profile: web tier, both Redis, one CPU worker) on loopback, with the tests' random-weight checkpoints in
the weights folder, and a Label Studio stand-in on the Docker bridge; then the requests Label Studio makes.

The tests run in file order on one stack; the last one takes it down."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from tests.assets import build_small_sam, decode_brush, recorded
from tests.docker import engine
from tests.grounding_dino_weights import write_checkpoint, write_config, write_text_encoder
from tests.label_studio_standin import LabelStudioStandIn
from tests.services import REPO, free_port
from tests.test_active_learning import annotation_event

pytestmark = pytest.mark.docker

PROJECT = "sam-backend-ci"
COMPOSE_FILES = ["-f", "docker/docker-compose.yml", "-f", "tests/docker/compose.ci.yml"]
SERVICES = ["redis-queue", "redis-cache", "web", "worker-cpu"]
WORKER_IMAGE = "sam-backend-worker:cpu"
HEALTHY_WITHIN_S = 900  # a cold worker on a loaded 2-core machine


def compose(*args: str, env: dict[str, str], timeout_s: float = 3600) -> subprocess.CompletedProcess:
    command = [*engine.compose_command(), "-p", PROJECT, *COMPOSE_FILES, "--profile", "cpu", *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-5000:]}{result.stderr}")
    return result


PROJECT_FILTER = f"label=com.docker.compose.project={PROJECT}"
# A container's service and its health ("starting", "healthy", "unhealthy"), or its state when it has no check.
HEALTH_FORMAT = (
    '{{index .Config.Labels "com.docker.compose.service"}} '
    "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}"
)


def project_containers() -> list[str]:
    """The stack's containers, running or not."""
    return engine.run("docker", "ps", "-q", "-a", "--filter", PROJECT_FILTER).stdout.split()


def health(container: str) -> tuple[str, str]:
    inspect = engine.run("docker", "inspect", "--format", HEALTH_FORMAT, container)
    service, _, state = inspect.stdout.strip().partition(" ")
    return service, state


def wait_healthy(timeout_s: float = HEALTHY_WITHIN_S) -> dict[str, str]:
    deadline = time.time() + timeout_s
    while True:
        states = dict(health(container) for container in project_containers())
        if sorted(states) == sorted(SERVICES) and set(states.values()) == {"healthy"}:
            return states
        if time.time() > deadline or "unhealthy" in states.values() or "exited" in states.values():
            for container in project_containers():  # the failing ones' last lines, for the stage's log
                service, state = health(container)
                if state != "healthy":
                    logs = engine.run("docker", "logs", "--tail", "40", container, check=False)
                    print(f"\n--- {service} ({state}):\n{logs.stdout}{logs.stderr}")
            return states
        time.sleep(3)


class Stack:
    def __init__(self, url: str, env: dict[str, str], label_studio: LabelStudioStandIn, timings: dict[str, float]):
        self.url = url
        self.env = env
        self.label_studio = label_studio
        self.timings = timings

    def post(self, path: str, body: dict, timeout_s: float = 600) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=timeout_s)


def write_weights(folder: Path) -> dict[str, str]:
    """The tests' small SAM and small GroundingDINO in `folder`; the settings that name them inside /weights."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(build_small_sam().state_dict(), folder / "sam_small.pth")
    text_encoder = write_text_encoder(folder / "bert")
    config = write_config(folder / "small_swint_ogc.py", enc_layers=1, dec_layers=1, num_queries=100)
    write_checkpoint(folder / "groundingdino_small.pth", config, text_encoder)
    return {
        "SAM_MODEL_TYPE": "vit_b",
        "SAM_CHECKPOINT": "/weights/sam_small.pth",
        "GROUNDING_DINO_CONFIG": "/weights/small_swint_ogc.py",
        "GROUNDING_DINO_CHECKPOINT": "/weights/groundingdino_small.pth",
        "GROUNDING_DINO_TEXT_ENCODER": "/weights/bert",
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory, media_root) -> Iterator[Stack]:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    engine.ensure_engine()
    gateway = engine.bridge_gateway()
    sources = engine.local_pip_sources()
    made = engine.ensure_base_images(gateway, sources)
    timings["engine and base images"] = time.perf_counter() - started
    print(f"\nDocker: {' '.join(engine.compose_command())}; stand-in base images made: {made or 'none'}")
    weights = tmp_path_factory.mktemp("docker-weights")
    label_studio = LabelStudioStandIn(media_root, host=gateway).start()
    port = free_port()
    env = {
        **os.environ,
        **write_weights(weights),
        "WEIGHTS_HOST_DIR": str(weights),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.legacy_token,
        "ML_BACKEND_PORT": str(port),
        # PyPI's PyTorch build (CUDA libraries included; it runs on CPU): PyTorch's CPU index is not reachable here.
        "TORCH_INDEX_URL": "",
    }
    try:
        with engine.PipMirror(engine.served_roots(sources), gateway):
            for service in ("web", "worker-cpu"):
                begun = time.perf_counter()
                compose("build", service, env=env)
                timings[f"build {service}"] = time.perf_counter() - begun
        begun = time.perf_counter()
        compose("up", "-d", env=env)
        wait_healthy()
        timings["up until healthy"] = time.perf_counter() - begun
        yield Stack(f"http://127.0.0.1:{port}", env, label_studio, timings)
    finally:
        compose("down", "-v", "--remove-orphans", env=env)
        label_studio.stop()
        sizes = engine.run("docker", "images", "--format", "{{.Repository}}:{{.Tag}} {{.Size}}").stdout
        print(f"\nDocker stage timings (s): {json.dumps({k: round(v) for k, v in timings.items()})}\n{sizes}")


def test_every_container_of_the_stack_is_healthy(stack):
    states = wait_healthy(60)
    assert states == dict.fromkeys(SERVICES, "healthy"), states


def test_the_worker_image_imports_every_model_library_with_one_headless_opencv():
    script = (REPO / "tests" / "docker" / "model_libraries.py").read_text()
    command = ["docker", "run", "--rm", "-i", WORKER_IMAGE, "python", "-"]
    run = subprocess.run(command, input=script, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["opencv"] == ["opencv-python-headless"] and summary["backend_modules"] > 50, summary


def click(stack: Stack) -> requests.Response:
    return stack.post("/predict", recorded("04-predict-interactive-keypoints.json"))


def test_a_keypoint_click_and_a_rectangle_are_answered_with_masks_by_the_worker(stack):
    assert requests.get(stack.url + "/health", timeout=10).json()["workers"] == 1
    for name in ("04-predict-interactive-keypoints.json", "05-predict-interactive-rectangle.json"):
        response = stack.post("/predict", recorded(name))
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"][0]["result"]
        mask = decode_brush(result)
        assert mask.shape == (768, 1024) and mask.any(), name


def test_a_text_prompt_is_answered(stack):
    response = stack.post("/predict", recorded("06-predict-interactive-text.json"))
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["model_version"]


def test_a_three_task_pre_annotation_is_answered(stack):
    body = recorded("03-predict-batch.json")
    body["tasks"] = body["tasks"][:3]  # Label Studio's uploads (the fourth is on another host)
    response = stack.post("/predict", body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 3 and "errors" not in response.json(), response.json()
    for entry, size in zip(results, [(1024, 768), (640, 480), (300, 400)], strict=True):
        brushes = [region for region in entry["result"] if region["type"] == "brushlabels"]
        assert brushes and all(decode_brush(region).shape == (size[1], size[0]) for region in brushes)


def test_an_annotation_webhook_is_recorded_in_the_training_set(stack):
    mask = np.zeros((480, 640), bool)
    mask[100:300, 200:400] = True
    body = annotation_event("ANNOTATION_CREATED", 1, 501, 2, "/data/upload/1/e0d87ad7-car_640x480.jpg", mask)
    response = stack.post("/webhook", body)
    assert response.status_code == 200 and response.json()["status"] == "queued", response.text
    deadline = time.time() + 300
    while time.time() < deadline:
        listing = requests.get(stack.url + "/versions?project=1", timeout=10).json()
        if listing["training_set"]["annotations"] == 1:
            break
        time.sleep(2)
    assert listing["training_set"] == {"annotations": 1, "masks": 1, "tasks": 1, "rejected_regions": 0}, listing


def test_after_a_worker_restart_the_next_click_is_answered_from_the_cached_embedding(stack):
    assert click(stack).headers["X-Embedding-Cache"] == "hit"
    begun = time.perf_counter()
    compose("restart", "worker-cpu", env=stack.env)
    # The restarted container's health check fails until its worker registers again: wait for "healthy" anew.
    time.sleep(2)
    assert wait_healthy() == dict.fromkeys(SERVICES, "healthy")
    stack.timings["worker restart until healthy"] = time.perf_counter() - begun
    response = click(stack)
    assert response.status_code == 200, response.text
    assert response.headers["X-Embedding-Cache"] == "hit"


def test_down_leaves_nothing_running(stack):
    compose("down", "-v", env=stack.env)
    assert project_containers() == []
    volumes = engine.run("docker", "volume", "ls", "-q", "--filter", PROJECT_FILTER)
    assert volumes.stdout.split() == []
