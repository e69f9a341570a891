"""The command line: `python -m backend serve|weights`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from backend.config import Settings


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from backend.app import build_app

    build_app(settings).run(host=args.host, port=args.port, threaded=True)
    return 0


def _weights(args: argparse.Namespace, settings: Settings) -> int:
    from backend.app import configure_logging
    from backend.models.checkpoints import SAM_CHECKPOINTS, download_checkpoint

    configure_logging(settings.log_level)
    for model_type in args.sam or [settings.sam_model_type]:
        path = download_checkpoint(SAM_CHECKPOINTS[model_type], Path(settings.weights_dir))
        logging.getLogger(__name__).info("SAM %s ready at %s", model_type, path)
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
    weights.set_defaults(run=_weights)

    worker = commands.add_parser("worker", help="run an inference worker taking jobs from Redis (INFERENCE=queue)")
    worker.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    worker.set_defaults(run=_worker)

    args = parser.parse_args(argv)
    return args.run(args, Settings.from_env())
