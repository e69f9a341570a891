"""The queue-mode web tier runs no model: with torch and every model library unimportable it starts, and answers
a click through a worker (which has them). This is what lets docker/Dockerfile.web leave torch out."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import requests

from tests.assets import recorded
from tests.services import REPO, free_port

MODEL_PACKAGES = ("torch", "torchvision", "segment_anything", "groundingdino", "onnxruntime", "transformers")

# Runs the web tier as `python -m backend serve` would, after making the model libraries fail to import.
WEB_TIER = f"""
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {MODEL_PACKAGES!r}:
            raise ImportError(f"{{name}} is not installed on the web tier")

sys.meta_path.insert(0, NotInstalled())
from backend.cli import main

sys.exit(main(["serve", "--host", "127.0.0.1", "--port", sys.argv[1]]))
"""


def test_the_queue_mode_web_tier_answers_a_click_without_torch(settings, workers, queue_redis, tmp_path):
    model_dir = str(tmp_path / "models")
    workers.start(1, MODEL_DIR=model_dir)
    port = free_port()
    env = dict(
        os.environ,
        INFERENCE="queue",
        REDIS_URL=queue_redis.url,
        MODEL_DIR=model_dir,
        LABEL_STUDIO_URL=settings.label_studio_url,
        LABEL_STUDIO_API_KEY=settings.label_studio_api_key,
        ALLOWED_IMAGE_HOSTS="localhost",
        ALLOW_PRIVATE_IMAGE_HOSTS="true",
        PREDICT_DEADLINE="60",
    )
    log_path = tmp_path / "web.log"
    with open(log_path, "w") as log:
        web = subprocess.Popen([sys.executable, "-c", WEB_TIER, str(port)], cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert web.poll() is None, log_path.read_text()
            try:
                health = requests.get(f"{url}/health", timeout=5)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        assert health.status_code == 200 and health.json()["inference"] == "queue"
        assert health.json()["redis_url"] == queue_redis.url and health.json()["redis_reachable"] is True
        answer = requests.post(f"{url}/predict", json=recorded("04-predict-interactive-keypoints.json"), timeout=90)
        assert answer.status_code == 200, answer.text
        (region,) = answer.json()["results"][0]["result"]
        assert region["type"] == "brushlabels" and region["value"]["rle"]
        assert "is not installed on the web tier" not in log_path.read_text()
        assert f"jobs go through Redis at {queue_redis.url}; the workers cache the embeddings" in log_path.read_text()
    finally:
        web.terminate()
        web.wait(10)
