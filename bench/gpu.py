"""The model paths on a GPU, side by side in one run: what DEVICE=cuda gives an annotator and a pre-annotation run.

    python bench/gpu.py [--models vit_b vit_l vit_h] [--batches 1 2 4 8] [--repeats 10]

Per SAM model (random weights at the official size, saved as Meta's .pth and loaded by the backend's own
loader), on 1024x768 images:
- encoder ms per image: segment-anything's `SamPredictor.set_image` (fp32, the reference), the backend's
  encoder (fp16 autocast on CUDA) one image per pass, and images/s with N images per pass (SAM_ENCODER_BATCH),
  with the GPU memory each pass size peaked at;
- a warm click: the backend's decoder on the GPU (PyTorch) beside ONNX Runtime on this machine's CPU;
- fp16 against fp32: the IoU between the masks the backend decodes from its fp16-autocast embedding and from
  SamPredictor's fp32 embedding, for the same clicks (mean and minimum over the clicks).
Then GroundingDINO SwinT OGC (random weights, a BERT-base-sized text encoder) detecting 3 labels: ms per image
one image per pass and in passes of 4, fp32 (as served) and under fp16 autocast (not served; measured to
decide whether it should be), and one image's whole pre-annotation (detect, encode, decode every box).

Timings are medians over --repeats after two warm-up passes, with torch.cuda.synchronize around each.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.models.base import ImageEmbedding, SegmentPrompt  # noqa: E402
from backend.models.grounding_dino import load_grounding_dino  # noqa: E402
from backend.models.sam import SamSegmenter, load_sam  # noqa: E402

WIDTH, HEIGHT = 1024, 768
LABELS = ("car", "wheel", "person")
CLICKS = 16


def scene(seed: int) -> np.ndarray:
    """A 1024x768 RGB picture: a gradient with a few filled rectangles and discs."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([xs * 200 // WIDTH, ys * 200 // HEIGHT, np.full_like(xs, 90)], axis=-1).astype(np.uint8)
    for _ in range(5):
        x, y = int(rng.integers(100, WIDTH - 100)), int(rng.integers(100, HEIGHT - 100))
        radius = int(rng.integers(30, 90))
        color = rng.integers(0, 255, 3)
        if rng.random() < 0.5:
            image[y - radius : y + radius, x - radius : x + radius] = color
        else:
            image[(xs - x) ** 2 + (ys - y) ** 2 < radius**2] = color
    return image


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        action()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory() -> Iterator[list[float]]:
    """Yields a list that holds the GPU memory peak (MiB) of the block once it ends."""
    peak: list[float] = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    yield peak
    peak.append(torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan"))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def bench_sam(model_type: str, folder: Path, args: argparse.Namespace) -> None:
    from segment_anything import SamPredictor, sam_model_registry

    torch.manual_seed(0)
    checkpoint = folder / f"sam_{model_type}_random.pth"
    torch.save(sam_model_registry[model_type]().state_dict(), checkpoint)
    segmenter = load_sam(checkpoint, model_type, args.device, "torch")
    images = [scene(seed) for seed in range(max(args.batches))]
    print(f"\nSAM {model_type} ({sum(p.numel() for p in segmenter.sam.parameters()) / 1e6:.0f} M parameters)")

    reference = SamPredictor(segmenter.sam)
    reference_s = median_seconds(lambda: reference.set_image(images[0]), args.repeats)
    single_s = median_seconds(lambda: segmenter.encode(images[0]), args.repeats)
    print(
        f"  encoder, 1 image: SamPredictor fp32 {reference_s * 1000:7.1f} ms | backend fp16 autocast "
        f"{single_s * 1000:7.1f} ms | ratio {reference_s / single_s:4.2f}x"
    )
    for batch in args.batches:
        batched = SamSegmenter(segmenter.sam, segmenter.identity, segmenter.device, "torch", encoder_batch=batch)
        with peak_memory() as peak:
            seconds = median_seconds(partial(batched.encode_batch, images[:batch]), args.repeats)
        print(
            f"  encoder, {batch} per pass: {batch / seconds:6.1f} images/s ({seconds / batch * 1000:6.1f} ms/image, "
            f"peak {peak[0]:7.0f} MiB)"
        )

    rng = np.random.default_rng(1)
    clicks = [
        SegmentPrompt(points=[(float(rng.integers(0, WIDTH)), float(rng.integers(0, HEIGHT)))], point_labels=[1])
        for _ in range(CLICKS)
    ]
    fp16 = segmenter.encode(images[0])
    reference.set_image(images[0])
    fp32 = ImageEmbedding(reference.get_image_embedding()[0].float().cpu().numpy(), fp16.original_size, fp16.input_size)
    overlaps = [
        iou(a.mask, b.mask) for a, b in zip(segmenter.decode(fp16, clicks), segmenter.decode(fp32, clicks), strict=True)
    ]
    print(f"  fp16 vs fp32 masks over {CLICKS} clicks: IoU mean {np.mean(overlaps):.4f}, min {np.min(overlaps):.4f}")

    gpu_click = median_seconds(lambda: segmenter.decode(fp16, clicks[:1]), args.repeats * 3)
    cpu_decoder = SamSegmenter(segmenter.sam.to("cpu"), segmenter.identity, torch.device("cpu"), "onnx")
    cpu_click = median_seconds(lambda: cpu_decoder.decode(fp16, clicks[:1]), args.repeats * 3)
    print(
        f"  warm click (decode): GPU PyTorch {gpu_click * 1000:6.1f} ms | CPU ONNX Runtime "
        f"({torch.get_num_threads()} threads) {cpu_click * 1000:6.1f} ms"
    )
    segmenter.sam.to(segmenter.device)


def bench_grounding_dino(folder: Path, args: argparse.Namespace) -> None:
    from tests.grounding_dino_weights import write_checkpoint, write_config, write_text_encoder

    bert = write_text_encoder(
        folder / "bert-base", hidden=768, layers=12, heads=12, intermediate=3072, vocab_size=30522
    )
    config = write_config(folder / "GroundingDINO_SwinT_OGC.py")
    detector = load_grounding_dino(write_checkpoint(folder / "gd.pth", config, bert), config, bert, args.device)
    caption = " . ".join(LABELS) + " ."
    spans, start = [], 0
    for label in LABELS:
        start = caption.index(label, start)
        spans.append((start, start + len(label)))
    groups = list(range(len(LABELS)))
    images = [scene(seed) for seed in range(4)]

    def detect(count: int, batch: int) -> Callable[[], object]:
        return lambda: detector.detect(images[:count], caption, spans, groups, 0.3, 0.25, 20, batch_size=batch)

    print("\nGroundingDINO SwinT OGC, 3 labels, 800-pixel short side")
    for precision, autocast in (("fp32 (served)", False), ("fp16 autocast", True)):
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast and torch.cuda.is_available()):
            one = median_seconds(detect(1, 1), args.repeats)
            four = median_seconds(detect(4, 4), args.repeats)
        print(f"  {precision:14}: 1 per pass {one * 1000:7.1f} ms/image | 4 per pass {four / 4 * 1000:7.1f} ms/image")

    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    checkpoint = folder / "sam_vit_b_random.pth"
    if not checkpoint.exists():
        torch.save(sam_model_registry["vit_b"]().state_dict(), checkpoint)
    segmenter = load_sam(checkpoint, "vit_b", args.device, "torch")

    def preannotate() -> None:
        (found,) = detector.detect(images[:1], caption, spans, groups, 0.3, 0.25, 20, batch_size=1)
        embedding = segmenter.encode(images[0])
        segmenter.decode(
            embedding,
            [SegmentPrompt(box=detection.box) for detection in found]
            or [SegmentPrompt(points=[(10.0, 10.0)], point_labels=[1])],
        )

    print(
        f"  one image's pre-annotation (detect, ViT-B encode, up to 20 boxes decoded): "
        f"{median_seconds(preannotate, args.repeats) * 1000:7.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-grounding-dino", action="store_true")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(
        f"torch {torch.__version__}, GPU: {gpu}, CPU: {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores), load average {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in args.models:
            bench_sam(model_type, Path(tmp), args)
        if not args.no_grounding_dino:
            bench_grounding_dino(Path(tmp), args)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
