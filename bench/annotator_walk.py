"""An annotator's walk through fresh tasks, as Label Studio serves them, against real gunicorn + redis-server + one
queue worker (INFERENCE=queue) and the Label Studio stand-in serving N fresh 1024x768 images.

For each mode the annotator opens task after task in ascending id order, clicks once right after opening (the
first click) and once more (a warm click, on the same image), then dwells D seconds before the next task:
- nothing: tasks Label Studio imported before the backend was connected, nothing prepared;
- import: the tasks arrive by the TASKS_CREATED webhook right before the walk (encode on import, and prefetch from
  the imported list);
- prefetch: the same webhook to a second web tier with ENCODE_ON_IMPORT=false (on the same worker: its jobs carry
  the setting), so only the PREFETCH_TASKS tasks after each requested one are encoded ahead;
- project: `POST /encode?project=` ran to its end before the walk.
Printed per mode: first-click p50/p95, warm-click p50, their ratio, encoder passes per image (from the worker's
log; 1 means no image encoded twice) and the bytes Redis holds.

With --cache-images K the worker caches in a Redis of its own (CACHE_REDIS_URL) bounded to about K embeddings
(`maxmemory`, `allkeys-lru`, as docs/scaling.md prescribes), smaller than the walk: the rows then also give the
first-click hit rate over the tasks after the K-th (`hits_after_fill`), when the cache has filled; the steady state
of a project larger than its cache. D defaults to 1.5x the encode time measured on
one extra image first. The task-open prediction (GroundingDINO) is not sent: no GroundingDINO weights here.

    python bench/annotator_walk.py --images 6 --sam vit_b --dwell-factor 1.5
    python bench/annotator_walk.py --images 60 --sam small --modes import --cache-images 12
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.assets import REPO, build_small_sam, recorded  # noqa: E402
from tests.label_studio_standin import LabelStudioStandIn  # noqa: E402
from tests.load_harness import ENCODED, GunicornServer, write_images  # noqa: E402
from tests.services import RedisServer  # noqa: E402

MODES = ("nothing", "import", "prefetch", "project")
ENTRY_BYTES = 2_097_248  # one cached ViT embedding (256x64x64 float16 and its header), about


def checkpoint(workdir: Path, sam: str) -> Path:
    path = workdir / f"sam_{sam}.pth"
    if sam == "small":
        torch.save(build_small_sam().state_dict(), path)
    else:
        from segment_anything import sam_model_registry

        torch.manual_seed(0)
        torch.save(sam_model_registry["vit_b"]().state_dict(), path)  # random weights: no download here
    return path


def click(url: str, project: int, task_id: int, image_url: str, x: float) -> tuple[float, str]:
    body = copy.deepcopy(recorded("04-predict-interactive-keypoints.json"))
    body["tasks"][0]["id"], body["tasks"][0]["data"]["image"] = task_id, image_url
    body["project"] = f"{project}.1795623701"  # as Label Studio names it: the walk's project, which prefetch reads
    body["params"]["context"]["result"][0]["value"]["x"] = x
    started = time.perf_counter()
    response = requests.post(url + "/predict", json=body, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - started, response.headers.get("X-Embedding-Cache", "")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def tasks_created(project: int, first_id: int, image_urls: list[str]) -> dict:
    body = recorded("12-webhook-tasks-created.json")
    template = body["tasks"][0]
    body["project"]["id"] = project
    body["tasks"] = [
        {**template, "id": first_id + index, "project": project, "data": {"image": url}}
        for index, url in enumerate(image_urls)
    ]
    return body


def hit_rate(caches: list[str]) -> str:
    hits = caches.count("hit")
    return f"{hits}/{len(caches)} ({100 * hits / max(len(caches), 1):.0f} %)"


def wait_encode_run(url: str, project: int) -> dict:
    while (progress := requests.get(url + "/encode", params={"project": project}, timeout=10).json())["state"] in (
        "starting",
        "running",
    ):
        time.sleep(0.5)
    return progress


def redis_bytes(redis_url: str) -> int:
    import redis

    connection = redis.Redis.from_url(redis_url)
    return sum(connection.memory_usage(key, samples=0) or 0 for key in connection.scan_iter(count=1000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--sam", choices=("vit_b", "small"), default="vit_b")
    parser.add_argument("--dwell-factor", type=float, default=1.5, help="D as a multiple of the encode time")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--cache-images", type=int, default=0, help="bound the cache to about this many embeddings")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="annotator-walk-"))
    redis_server = RedisServer(workdir).start()
    cache_server = None
    if args.cache_images:
        bound = str(args.cache_images * ENTRY_BYTES + 4 * 1024 * 1024)  # and Redis's own few MiB
        (workdir / "cache").mkdir()
        cache_server = RedisServer(workdir / "cache", "--maxmemory", bound, "--maxmemory-policy", "allkeys-lru")
        cache_server.start()
    media = workdir / "media"
    calibration = write_images(media / "upload" / "1", 1, seed=9000)
    label_studio = LabelStudioStandIn(media).start()
    environment = {
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.legacy_token,
        "SAM_CHECKPOINT": str(checkpoint(workdir, args.sam)),
        "SAM_MODEL_TYPE": "vit_b",
        "REDIS_URL": redis_server.url,
        "INFERENCE": "queue",
        "MODEL_DIR": str(workdir / "models"),
        "JOB_TIMEOUT": "600",
        "PREDICT_DEADLINE": "600",
        "DOWNLOAD_TIMEOUT": "60",
        **({"CACHE_REDIS_URL": cache_server.url} if cache_server else {}),
    }
    worker_log = workdir / "worker.log"
    with open(worker_log, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "backend", "worker"],
            cwd=REPO,
            env={**os.environ, **environment},
            stdout=log,
            stderr=log,
        )
    server = GunicornServer(environment, workdir / "gunicorn.log", workers=1, threads=4).start()
    prefetch_only = (
        GunicornServer({**environment, "ENCODE_ON_IMPORT": "false"}, workdir / "prefetch.log", workers=1, threads=4)
        if "prefetch" in args.modes.split(",")
        else None
    )
    try:
        while requests.get(server.url + "/status", timeout=10).json().get("workers", 0) < 1:
            time.sleep(1)
        cold_s, _ = click(server.url, 9000, 9000, calibration[0], 40.0)
        warm_s, _ = click(server.url, 9000, 9000, calibration[0], 60.0)
        encode_s = cold_s - warm_s
        dwell_s = args.dwell_factor * encode_s
        label_config = recorded("03-predict-batch.json")["label_config"]
        print(
            f"SAM {args.sam} ({'random weights' if args.sam == 'vit_b' else 'reduced size, random weights'}), "
            f"{args.images} images 1024x768, cold click {cold_s:.2f} s, warm {warm_s:.3f} s, "
            f"encode ~{encode_s:.2f} s, dwell D = {args.dwell_factor:g} x encode = {dwell_s:.2f} s"
            + (f", cache bounded to ~{args.cache_images} embeddings" if cache_server else "")
        )
        rows = []
        for index, mode in enumerate(args.modes.split(",")):
            image_urls = write_images(media / "upload" / "1", args.images, seed=1000 * (index + 1))
            project = label_studio.add_project(label_config, image_urls)
            first_id = label_studio.projects[project]["tasks"][0]["id"]
            offset = worker_log.stat().st_size
            bytes_before = redis_bytes(redis_server.url)
            load_before = os.getloadavg()[0]
            url = prefetch_only.start().url if mode == "prefetch" and prefetch_only else server.url
            if mode in ("import", "prefetch"):
                requests.post(url + "/webhook", json=tasks_created(project, first_id, image_urls), timeout=10)
            elif mode == "project":
                requests.post(url + "/encode", params={"project": project}, timeout=30)
                wait_encode_run(url, project)
            firsts, warms, caches = [], [], []
            for position, image_url in enumerate(image_urls):
                first, cache = click(url, project, first_id + position, image_url, 40.0)
                warm, _ = click(url, project, first_id + position, image_url, 60.0)
                firsts.append(first)
                warms.append(warm)
                caches.append(cache)
                time.sleep(dwell_s)
            with open(worker_log, "rb") as handle:
                handle.seek(offset)
                encodes = Counter(ENCODED.findall(handle.read().decode("utf-8", "replace")))
            rows.append(
                {
                    "mode": mode,
                    "first_p50_s": round(statistics.median(firsts), 3),
                    "first_p95_s": round(percentile(firsts, 95), 3),
                    "warm_p50_s": round(statistics.median(warms), 3),
                    "first_over_warm": round(statistics.median(firsts) / statistics.median(warms), 1),
                    "first_click_hits": f"{caches.count('hit')}/{len(caches)}",
                    **({"hits_after_fill": hit_rate(caches[args.cache_images :])} if cache_server else {}),
                    "encodes_per_image_max": max(encodes.values(), default=0),
                    "images_encoded": len(encodes),
                    "redis_bytes_added": redis_bytes(redis_server.url) - bytes_before,
                    "load_avg_1m": f"{load_before:.2f}->{os.getloadavg()[0]:.2f}",
                }
            )
            print(json.dumps(rows[-1]), flush=True)
        print()
        print("| " + " | ".join(rows[0]) + " |")
        print("|" + "---|" * len(rows[0]))
        for row in rows:
            print("| " + " | ".join(str(value) for value in row.values()) + " |")
    finally:
        server.stop()
        if prefetch_only:
            prefetch_only.stop()
        worker.terminate()
        worker.wait(timeout=60)
        label_studio.stop()
        redis_server.stop()
        if cache_server:
            cache_server.stop()


if __name__ == "__main__":
    main()
