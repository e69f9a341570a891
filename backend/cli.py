"""The command line: `python -m backend serve|weights|predict|demo`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from backend.config import Settings


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from backend.app import build_app

    build_app(settings).run(host=args.host, port=args.port, threaded=True)
    return 0


def _weights(args: argparse.Namespace, settings: Settings) -> int:
    from backend.app import configure_logging
    from backend.models.checkpoints import (
        GROUNDING_DINO_CHECKPOINT,
        SAM_CHECKPOINTS,
        download_checkpoint,
        download_text_encoder,
    )

    configure_logging(settings.log_level)
    log = logging.getLogger(__name__)
    for model_type in args.sam or [settings.sam_model_type]:
        path = download_checkpoint(SAM_CHECKPOINTS[model_type], Path(settings.weights_dir))
        log.info("SAM %s ready at %s", model_type, path)
    if not args.no_grounding_dino:
        path = download_checkpoint(GROUNDING_DINO_CHECKPOINT, Path(settings.weights_dir))
        log.info("GroundingDINO ready at %s", path)
        log.info("text encoder ready at %s", download_text_encoder(settings.grounding_dino_text_encoder))
    return 0


def _predict(args: argparse.Namespace, settings: Settings) -> int:
    """Segment what `--text` names in one image: detections as JSON on stdout, the overlay in `--out`."""
    from dataclasses import replace

    from PIL import Image

    from backend.app import configure_logging
    from backend.cache.store import make_store
    from backend.demo import LOAD_WAIT_S
    from backend.images import FetchedImage, ImageError
    from backend.models.loader import ModelNotReady
    from backend.predictor import Predictor
    from backend.prompts.interactive import PromptError
    from backend.segment_text import detections_json, overlay, segment_text

    configure_logging(settings.log_level)
    settings = replace(settings, model_ready_timeout_s=LOAD_WAIT_S)
    predictor = Predictor(settings, make_store(settings.redis_url, settings.memory_cache_bytes))
    try:
        image = FetchedImage(str(args.image), args.image.read_bytes())
        prediction = segment_text(
            predictor,
            image,
            args.text,
            settings.box_threshold if args.box_threshold is None else args.box_threshold,
            settings.text_threshold if args.text_threshold is None else args.text_threshold,
        )
        picture = overlay(image, prediction, settings.max_image_pixels)
    except (OSError, ImageError, PromptError, ModelNotReady) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.out is not None:
        Image.fromarray(picture).save(args.out)
    print(json.dumps({"image": str(args.image), **detections_json(prediction)}, indent=2))
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from backend.app import configure_logging

    try:
        from backend.demo import build_demo
    except ImportError as error:  # gradio is an optional extra
        print(f"error: the demo needs `pip install -r requirements-demo.txt` ({error})", file=sys.stderr)
        return 1
    configure_logging(settings.log_level)
    build_demo(settings).launch(server_name=args.host, server_port=args.port)
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from backend.app import configure_logging
    from backend.worker.runner import run_worker

    configure_logging(settings.log_level)
    return run_worker(settings, burst=args.burst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend", description="SAM backend for Label Studio")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server (development; use gunicorn in production)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=9090)
    serve.set_defaults(run=_serve)

    weights = commands.add_parser("weights", help="download and verify the official checkpoints")
    weights.add_argument("action", choices=["download"])
    weights.add_argument("--sam", action="append", choices=["vit_b", "vit_l", "vit_h"], help="SAM model type(s)")
    weights.add_argument("--no-grounding-dino", action="store_true", help="skip GroundingDINO and its text encoder")
    weights.set_defaults(run=_weights)

    worker = commands.add_parser("worker", help="run an inference worker taking jobs from Redis (INFERENCE=queue)")
    worker.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    worker.set_defaults(run=_worker)
    predict = commands.add_parser("predict", help="segment what a text prompt names in one image")
    predict.add_argument("image", type=Path)
    predict.add_argument("--text", required=True, help='comma-separated phrases, e.g. "car, wheel"')
    predict.add_argument("--out", type=Path, help="write the overlay (masks, boxes, labels) to this picture file")
    predict.add_argument("--box-threshold", type=float, help="default: BOX_THRESHOLD")
    predict.add_argument("--text-threshold", type=float, help="default: TEXT_THRESHOLD")
    predict.set_defaults(run=_predict)

    demo = commands.add_parser("demo", help="the Gradio demo page (pip install -r requirements-demo.txt)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=7860)
    demo.set_defaults(run=_demo)

    args = parser.parse_args(argv)
    return args.run(args, Settings.from_env())
