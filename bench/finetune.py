"""Fine-tuning speed and effect on the synthetic shapes set: steps per second and held-out mIoU before and
after, for the small random-weight SAM the tests use or, with --checkpoint, an official SAM checkpoint.

    python bench/finetune.py                       # small SAM from random weights, CPU
    python bench/finetune.py --checkpoint weights/sam_vit_b_01ec64.pth --device cuda

Prints one line per phase and a summary; the same seed gives the same data, prompts and steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.models.sam import load_sam, with_decoder_state  # noqa: E402
from backend.training.finetune import FinetuneConfig, evaluate_miou, finetune, make_example  # noqa: E402
from tests.assets import build_small_sam  # noqa: E402
from tests.synthetic_shapes import shape_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="an official SAM .pth (default: the tests' small SAM)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-images", type=int, default=16)
    parser.add_argument("--held-out-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--correction-rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(scratch) / "sam_small.pth"
            torch.save(build_small_sam(seed=0).state_dict(), checkpoint)
        segmenter = load_sam(checkpoint, device=args.device, decoder_runtime="torch")
    print(f"model {segmenter.identity} on {args.device}, {torch.get_num_threads()} torch threads")

    images = shape_images(range(args.train_images + args.held_out_images))
    started = time.perf_counter()
    examples = [make_example(segmenter.encode(image), mask) for image, mask in images]
    encode_s = time.perf_counter() - started
    print(f"encoded {len(images)} images of {images[0][0].shape[1]}x{images[0][0].shape[0]} in {encode_s:.1f} s")
    train, held_out = examples[: args.train_images], examples[args.train_images :]

    model = with_decoder_state(segmenter.sam)
    started = time.perf_counter()
    before = evaluate_miou(model, held_out)
    evaluate_s = time.perf_counter() - started
    config = FinetuneConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        correction_rounds=args.correction_rounds,
    )
    report = finetune(model, train, config)
    after = evaluate_miou(model, held_out)
    passes = report.steps * min(config.batch_size, len(train)) * (1 + config.correction_rounds)
    print(
        f"config: {config.steps} steps x {config.batch_size} masks x {1 + config.correction_rounds} decoder passes, "
        f"lr {config.learning_rate}"
    )
    speed = f"{report.steps_per_second:.3f} steps/s, {passes / report.seconds:.2f} decoder passes/s"
    print(f"fine-tuning: {report.seconds:.1f} s, {speed}")
    print(f"loss: {report.first_loss:.3f} (first step) -> {report.last_loss:.3f} (last step)")
    scored = f"{len(held_out)} masks, box + centre click each"
    print(f"held-out mIoU ({scored}): {before:.3f} -> {after:.3f} ({after - before:+.3f})")
    print(f"evaluation: {evaluate_s / (2 * len(held_out)) * 1000:.0f} ms per prompt")


if __name__ == "__main__":
    main()
