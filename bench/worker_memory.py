"""A worker's RSS over rounds of clicks and trainings: what the first training costs once, and whether later ones add.

    python bench/worker_memory.py [--rounds N] [--tasks N]

One process as a local-mode backend or a queue worker holds it: the tests' reduced SAM (ONNX decoder on CPU), a
project of N annotated shape images served by the Label Studio stand-in, and per round a click on every image, then
a training whose new version this process loads to serve (on CPU an ONNX export), then the freed heap handed back
as a worker does after each job (`hand_back_freed_memory`). RSS is printed after start-up and after each round; the
soak's flat-memory bar compares a worker's RSS after warm-up with its RSS at the end (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.cache.store import MemoryStore  # noqa: E402
from backend.config import Settings  # noqa: E402
from backend.images import FetchedImage  # noqa: E402
from backend.inference.local import Predictor  # noqa: E402
from backend.project_files import ProjectFiles  # noqa: E402
from backend.prompts.interactive import ContextPrompts  # noqa: E402
from backend.training.dataset import AnnotationRecord, Region, TrainingSet  # noqa: E402
from backend.worker.runner import hand_back_freed_memory  # noqa: E402
from tests.assets import build_small_sam, encode  # noqa: E402
from tests.label_studio_standin import LabelStudioStandIn  # noqa: E402
from tests.synthetic_shapes import shape_image  # noqa: E402

PROJECT = 1


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tasks", type=int, default=24)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="worker-memory-"))
    checkpoint = folder / "sam_small.pth"
    torch.save(build_small_sam().state_dict(), checkpoint)
    media = folder / "media"
    server = LabelStudioStandIn(media).start()
    settings = replace(
        Settings(),
        label_studio_url=server.url,
        label_studio_api_key=server.legacy_token,
        allow_private_image_hosts=True,
        sam_checkpoint=str(checkpoint),
        model_dir=str(folder / "models"),
        train_after_annotations=0,
        train_steps=4,
        train_batch_size=2,
    )
    predictor = Predictor(settings, MemoryStore(1 << 30))
    predictor.models.get(120)
    training_set = TrainingSet(ProjectFiles(settings.model_dir, PROJECT))
    images = []
    for task in range(1, args.tasks + 1):
        image, mask = shape_image(task, height=384, width=512)
        path = media / "upload" / "shapes" / f"{task}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(image, "PNG"))
        url = f"/data/upload/shapes/{task}.png"
        training_set.put(AnnotationRecord(task, task, url, [Region.of_mask(f"r{task}", "Car", mask)]))
        images.append((task, url, predictor.fetcher.fetch(url)))
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f}; {args.tasks} tasks, {args.rounds} rounds")
    print(f"after start-up: {rss_mib():8.1f} MiB")
    click = ContextPrompts(keypoints={"Car": [(50.0, 50.0, 1)]})
    for round_ in range(1, args.rounds + 1):
        for task, _, image in images:
            fetched: FetchedImage = image
            predictor.predict_for_image(fetched, task, click, PROJECT)
        result = predictor.train_project(PROJECT)
        predictor.predict_for_image(images[0][2], 0, click, PROJECT)  # served by the new version, when accepted
        hand_back_freed_memory()
        print(f"after round {round_}: {rss_mib():8.1f} MiB  (training: {result.status} {result.version or ''})")
    print(f"load average (1 min) at end: {os.getloadavg()[0]:.2f}")
    server.stop()


if __name__ == "__main__":
    main()
