"""Every segmenter side by side at its official size, random weights, one 1024x768 image: the cold click (the
image's first click: encoder pass + decode), the warm click (decode from the float16 cache entry), the bytes per
image in the cache, and the process's peak RSS; each with its ratio to SAM ViT-B.

Each model runs in a child process of its own, so its peak RSS is its own. The first encoder pass of a process
warms torch up on another image and is not counted. Random weights decode to noisier masks than trained ones;
the sizes and so the compute are the official models'.

    python bench/models.py [--device cpu|cuda] [--threads 2] [--repeats 3] [--models vit_b,edgetam,...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WIDTH, HEIGHT = 1024, 768
DEFAULT_MODELS = ("vit_b", "sam2.1-hiera-tiny", "sam2.1-hiera-small", "edgetam", "sam-hq-vit-b")


def build_segmenter(name: str, device: str):  # -> Segmenter
    import torch

    if name.startswith("vit_"):
        from segment_anything import sam_model_registry

        from backend.models.sam import SamSegmenter

        torch.manual_seed(0)
        return SamSegmenter(sam_model_registry[name](), f"bench-{name}", torch.device(device))
    from backend.models.checkpoints import TRANSFORMERS_MODELS
    from backend.models.hf_segmenter import FAMILIES, HfSegmenter
    from tests.hf_segmenters import build

    model, processor = build(name, reduced=False)
    family = FAMILIES[TRANSFORMERS_MODELS[name].model_type]
    return HfSegmenter(model, processor, family, f"bench-{name}", torch.device(device))


def measure(name: str, device: str, threads: int, repeats: int) -> dict:
    """One model's figures, in this process."""
    import torch

    from backend.cache.embeddings import deserialize_embedding, serialize_embedding
    from backend.models.base import SegmentPrompt
    from tests.assets import smooth_object_image

    torch.set_num_threads(threads)
    segmenter = build_segmenter(name, device)
    click = [SegmentPrompt(points=[(WIDTH * 0.45, HEIGHT * 0.5)], point_labels=[1])]

    def synced() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    segmenter.encode(smooth_object_image(WIDTH, HEIGHT, seed=99))  # warm-up, not counted
    cold, warm, data = [], [], b""
    for repeat in range(repeats):
        image = smooth_object_image(WIDTH, HEIGHT, seed=repeat)
        started = time.perf_counter()
        embedding = segmenter.encode(image)
        data = serialize_embedding(embedding)
        cached = deserialize_embedding(data)
        segmenter.decode(cached, click)
        synced()
        cold.append(time.perf_counter() - started)
        for _ in range(5):
            started = time.perf_counter()
            segmenter.decode(cached, click)
            synced()
            warm.append(time.perf_counter() - started)
    return {
        "model": name,
        "cold_click_s": statistics.median(cold),
        "warm_click_s": statistics.median(warm),
        "cache_bytes": len(data),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one model, measured in this process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.device, args.threads, args.repeats)))
        return
    names = args.models.split(",")
    load_before = os.getloadavg()[0]
    rows = []
    for name in names:
        command = [sys.executable, __file__, "--child", name, "--device", args.device]
        command += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
        # The child builds EdgeTAM's RepViT from its architecture name; nothing may reach the hub.
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        child = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"{name} failed:\n{child.stderr}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"measured {name}", file=sys.stderr)
    base = next((row for row in rows if row["model"] == "vit_b"), rows[0])
    print(
        f"{args.device}, torch threads {args.threads}, {WIDTH}x{HEIGHT}, random weights at official sizes, "
        f"median of {args.repeats} cold / {5 * args.repeats} warm clicks; load average {load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs"
    )
    print(f"ratios to {base['model']}")
    print(
        f"| model | cold click s | x{base['model']} | warm click ms | x{base['model']} | cache MiB/image | "
        f"peak RSS MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['model']} | {row['cold_click_s']:.2f} | {row['cold_click_s'] / base['cold_click_s']:.2f} | "
            f"{row['warm_click_s'] * 1000:.0f} | {row['warm_click_s'] / base['warm_click_s']:.2f} | "
            f"{row['cache_bytes'] / 2**20:.1f} | {row['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
