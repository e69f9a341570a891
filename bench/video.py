"""Frames per second tracked, for 1 and 5 objects, by each video predictor at its official size (random weights),
on a generated 640x360 video of moving shapes; with the process's peak RSS and the ratios to the first model.

Each model runs in a child process of its own (its peak RSS is its own). Every object gets a box on frame 0 and is
tracked forward through `--frames` frames, all objects in one pass (backend/models/video_tracker.py). The first
tracked frames warm torch up in both runs alike; random weights cost what trained ones do.

    python bench/video.py [--device cpu|cuda] [--threads 2] [--frames 12] [--models sam2.1-hiera-tiny,edgetam,sam3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WIDTH, HEIGHT = 640, 360
OBJECT_COUNTS = (1, 5)
DEFAULT_MODELS = ("sam2.1-hiera-tiny", "edgetam", "sam3")


def measure(name: str, device: str, threads: int, frames: int) -> dict:
    """One model's figures, in this process."""
    import torch

    from backend.models.video_tracker import BoxPrompt, VideoTracker
    from backend.videos import VideoFile, VideoLimits
    from tests.hf_segmenters import build_video
    from tests.synthetic_video import write_moving_shapes

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, processor = build_video(name, reduced=False)
    tracker = VideoTracker(model, processor, f"bench-{name}", torch.device(device))
    figures: dict = {"model": name, "output_bytes": 0, "frame_bytes": 0}

    def stored_sizes(module, args, kwargs) -> None:
        """The largest frame output one object's session holds (its memory bank's unit), and a frame's pixels."""
        session = kwargs["inference_session"]
        for outputs in session.output_dict_per_obj.values():
            for kind in ("cond_frame_outputs", "non_cond_frame_outputs"):
                for output in outputs[kind].values():
                    size = sum(value.nbytes for value in output.values() if isinstance(value, torch.Tensor))
                    figures["output_bytes"] = max(figures["output_bytes"], size)

    model.register_forward_pre_hook(stored_sizes, with_kwargs=True)
    figures["frame_bytes"] = 3 * processor.image_processor.size["height"] * processor.image_processor.size["width"] * 4
    with tempfile.TemporaryDirectory() as folder:
        shapes = write_moving_shapes(Path(folder) / "shapes.mp4", frames=frames, height=HEIGHT, width=WIDTH)
        video = VideoFile.open(shapes.path, VideoLimits(max_frames=frames, max_pixels=WIDTH * HEIGHT))
        for count in OBJECT_COUNTS:
            # The two shapes, then boxes on the background around the picture.
            boxes = [shapes.box(0, 0), shapes.box(1, 0)]
            boxes += [(40.0 + 120 * i, 250.0, 140.0 + 120 * i, 340.0) for i in range(count - 2)]
            prompts = [BoxPrompt(object_id, 0, box) for object_id, box in enumerate(boxes[:count], start=1)]
            started = time.perf_counter()
            tracked = sum(1 for _ in tracker.track(video, prompts))
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            figures[f"fps_{count}"] = tracked / seconds
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one model, measured in this process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.device, args.threads, args.frames)))
        return
    load_before = os.getloadavg()[0]
    rows = []
    for name in args.models.split(","):
        command = [sys.executable, __file__, "--child", name, "--device", args.device]
        command += ["--threads", str(args.threads), "--frames", str(args.frames)]
        # The child builds EdgeTAM's RepViT from its architecture name; nothing may reach the hub.
        child = subprocess.run(
            command, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True
        )
        if child.returncode:
            sys.exit(f"{name} failed:\n{child.stderr}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"measured {name}", file=sys.stderr)
    base = rows[0]
    print(
        f"{args.device}, torch threads {args.threads}, {WIDTH}x{HEIGHT} video, {args.frames} frames tracked forward "
        f"from a box on frame 0, random weights at official sizes; load average {load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs"
    )
    print(f"ratios to {base['model']} with one object")
    print(
        "| model | fps, 1 object | x | fps, 5 objects | x | 5 objects / 1 | peak RSS MiB | MiB per object and "
        "frame kept | MiB per frame the library would keep |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['model']} | {row['fps_1']:.3f} | {row['fps_1'] / base['fps_1']:.2f} | {row['fps_5']:.3f} | "
            f"{row['fps_5'] / base['fps_1']:.2f} | {row['fps_5'] / row['fps_1']:.2f} | {row['peak_rss_mb']:.0f} | "
            f"{row['output_bytes'] / 2**20:.2f} | {row['frame_bytes'] / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
