"""The command line: `python -m backend serve|weights|worker|preannotate|encode|track|predict|demo|inbox|evaluate|
settings`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from backend.config import DETECTORS, SAM_TYPES, TRANSFORMERS_SEGMENTERS, VIDEO_MODELS, Settings, describe_markdown
from backend.errors import SettingsError

SEGMENTERS = [*SAM_TYPES, *TRANSFORMERS_SEGMENTERS]


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from backend.app import build_app
    from backend.http.access import open_to_the_network

    app = build_app(settings)
    if warning := open_to_the_network([f"{args.host}:{args.port}"], settings):
        logging.getLogger(__name__).warning(warning)
    app.run(host=args.host, port=args.port, threaded=True)
    return 0


def _weights(args: argparse.Namespace, settings: Settings) -> int:
    """Fetch the official weights the settings expect and lack; files already there, and files a setting points
    at, are used as they are. Each failure is one line on stderr."""
    from dataclasses import replace

    from backend.app import configure_logging
    from backend.errors import BackendError
    from backend.models.checkpoints import download_checkpoint, missing_checkpoint
    from backend.models.registry import detector_weights, sam_checkpoint, video_checkpoint
    from backend.tools.demo import with_detector

    configure_logging(settings.log_level)
    log = logging.getLogger(__name__)
    # Types named on the command line are official files asked for by name; otherwise, what the settings load.
    wanted = [sam_checkpoint(replace(settings, sam_checkpoint="", sam_model_type=kind)) for kind in args.sam or []]
    wanted = wanted or [sam_checkpoint(settings)]
    # The video predictor's folder only when asked: an image project never reads it.
    wanted += [video_checkpoint(replace(settings, video_checkpoint="", video_model=kind)) for kind in args.video or []]
    failures = 0
    if not args.no_grounding_dino:
        for detector in args.detector or [settings.detector]:
            try:
                wanted += detector_weights(with_detector(settings, detector))
            except BackendError as error:  # a detector without an official download names what to do instead
                print(f"error: {error}", file=sys.stderr)
                failures += 1
    for location in wanted:
        if location.path.exists():
            log.info("%s weights: using %s", location.what, location.describe())
            continue
        try:
            if location.official is None:
                raise missing_checkpoint(location)
            log.info("%s weights ready at %s", location.what, download_checkpoint(location, token=settings.hf_token))
        except (BackendError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0


def _predict(args: argparse.Namespace, settings: Settings) -> int:
    """Segment what `--text` names in one image: detections as JSON on stdout, the overlay in `--out`."""
    from dataclasses import replace

    from PIL import Image

    from backend.app import configure_process
    from backend.cache.store import make_store
    from backend.errors import ImageError, ModelNotReady, PromptError
    from backend.images import FetchedImage
    from backend.inference.local import Predictor
    from backend.tools.demo import LOAD_WAIT_S, with_detector, with_segmenter
    from backend.tools.segment_text import detections_json, overlay, segment_text

    configure_process(settings)
    if args.sam_model:
        settings = with_segmenter(settings, args.sam_model)
    settings = replace(with_detector(settings, args.detector or settings.detector), model_ready_timeout_s=LOAD_WAIT_S)
    predictor = Predictor(settings, make_store(settings.cache_url, settings.memory_cache_bytes))
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
    from backend.app import configure_process

    try:
        from backend.tools.demo import build_demo
    except ImportError as error:  # gradio is an optional extra
        print(f"error: the demo needs `pip install -r requirements-demo.txt` ({error})", file=sys.stderr)
        return 1
    configure_process(settings)
    build_demo(settings).launch(server_name=args.host, server_port=args.port)
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    if args.alive:
        return _worker_alive(settings)
    from backend.app import configure_process
    from backend.worker.runner import run_worker

    configure_process(settings)
    return run_worker(settings, burst=args.burst)


def _worker_alive(settings: Settings) -> int:
    """A worker container's health check: healthy while a worker of this host (the container) is registered."""
    import socket

    import redis

    from backend.cache.connection import redis_client
    from backend.inference.queue import workers_on_host

    if not settings.redis_url:
        print("unhealthy: REDIS_URL is not set", file=sys.stderr)
        return 1
    hostname = socket.gethostname()
    try:
        count = workers_on_host(redis_client(settings.redis_url), hostname)
    except redis.RedisError as error:
        print(f"unhealthy: the queue's Redis cannot be read ({error})", file=sys.stderr)
        return 1
    print(f"{count} worker(s) of host {hostname} registered")
    return 0 if count else 1


def _project_run(args: argparse.Namespace, settings: Settings) -> int:
    """Pre-annotate (`preannotate`), encode (`encode`) or track the videos of (`track`) a whole project in the
    foreground, with a progress bar;
    Ctrl-C stops after the batches in flight are stored, and running the same command again resumes (advised only
    where it helps: not after a refusal such as a wrong URL, key or label config)."""
    import signal
    import threading
    from dataclasses import replace

    from tqdm import tqdm

    from backend.app import configure_process, make_predictor
    from backend.errors import ProjectApiError
    from backend.protocol.project_api import ProjectApi
    from backend.runs.encode import EncodeRun
    from backend.runs.preannotate import ProjectRun, RunProgress
    from backend.runs.video import VideoTrackRun

    configure_process(settings)
    # A bulk run waits for the models and for busy workers longer than a Label Studio request may.
    settings = replace(
        settings,
        model_ready_timeout_s=max(settings.model_ready_timeout_s, 600.0),
        predict_deadline_s=max(settings.predict_deadline_s, 600.0),
    )
    try:
        api = ProjectApi(settings.label_studio_url, settings.label_studio_api_key)
        predictor = make_predictor(settings)
    except (ProjectApiError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    run_class = {"encode": EncodeRun, "track": VideoTrackRun}.get(args.command, ProjectRun)
    defaults = run_class.default_options(settings, predictor)
    options = replace(
        defaults,
        page_size=args.page_size,
        batch_size=getattr(args, "batch_size", None) or defaults.batch_size,
        parallel=getattr(args, "parallel", None) or defaults.parallel,
        max_tasks=args.max_tasks,
        skip_annotated=getattr(args, "skip_annotated", False),
    )
    stop = threading.Event()

    def stop_on_signal(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping once the batches in flight are stored (again to abort)", file=sys.stderr)

    signal.signal(signal.SIGINT, stop_on_signal)
    signal.signal(signal.SIGTERM, stop_on_signal)
    bar = tqdm(desc=f"project {args.project}", unit="task", dynamic_ncols=True)

    def show(progress: RunProgress) -> None:
        # The bar counts the tasks that need work: skipped ones leave its total, so rate and ETA stay true.
        bar.total = max(progress.total - progress.skipped, 0)
        bar.n = progress.predicted + progress.failed
        counts: dict[str, object] = {
            "predicted": progress.predicted,
            "skipped": progress.skipped,
            "failed": progress.failed,
        }
        if progress.frames_total:  # a video being tracked
            counts["frames"] = f"{progress.frames_done}/{progress.frames_total} of task {progress.task}"
        bar.set_postfix(counts, refresh=False)
        bar.refresh()

    progress = run_class(args.project, predictor, api, settings, options, show, stop.is_set).run()
    bar.close()
    print(json.dumps(progress.as_dict()))
    if progress.state == "finished":
        return 0
    resume = progress.state == "stopped" or progress.resumable
    print(
        f"{progress.state}: {progress.message}{'; run the same command again to resume' if resume else ''}",
        file=sys.stderr,
    )
    if progress.state != "stopped":
        return 1
    return 130 if stop.is_set() else 0  # stopped by a signal, or by --max-tasks as asked


def _inbox_replay(args: argparse.Namespace, settings: Settings) -> int:
    """Put a project's set-aside webhook events back in its inbox and apply them as the backend would: here (with
    INFERENCE=local, loading the models) or on a worker (INFERENCE=queue). Prints what is still set aside after."""
    from backend.app import configure_process, make_predictor
    from backend.project_files import ProjectFiles
    from backend.training.ingest import Inbox

    configure_process(settings, runs_models=settings.inference == "local")
    predictor = make_predictor(settings)
    replayed = predictor.learning.replay_set_aside(args.project)
    if settings.inference == "local" and not predictor.learning.wait_idle(args.wait):
        print(f"error: the events were not applied within {args.wait:g} s; they wait in the inbox", file=sys.stderr)
        return 1
    left = Inbox(ProjectFiles(settings.model_dir, args.project)).set_aside_events()
    where = "applied here" if settings.inference == "local" else "queued for a worker"
    print(json.dumps({"project": args.project, "replayed": replayed, "where": where, "set_aside": left}, indent=2))
    return 1 if left else 0


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """Score the configured segmenter and the project's versions on its annotations; print the table, write the
    report under MODEL_DIR/<project>/reports/."""
    from backend.app import configure_process
    from backend.training.report import evaluate_project
    from backend.training.resources import shared_resources

    configure_process(settings)
    try:
        report = evaluate_project(args.project, settings, shared_resources(settings), args.tasks)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report["markdown"])
    print(
        f"\n{report['tasks']} of the project's annotated tasks, {report['seconds']} s; "
        f"written to {', '.join(report['written_to'])}"
    )
    return 0


def _settings(args: argparse.Namespace, settings: Settings) -> int:
    if args.markdown:
        print(describe_markdown(), end="")
    else:
        print(json.dumps(settings_summary(settings), indent=2))
    return 0


def settings_summary(settings: Settings) -> dict[str, object]:
    """The settings in force, secrets left out: what an operator checks when a value seems ignored."""
    from dataclasses import fields

    return {
        definition.metadata["env"]: getattr(settings, definition.name)
        for definition in fields(settings)
        if definition.repr
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend", description="SAM backend for Label Studio")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server (development; use gunicorn in production)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=9090)
    serve.set_defaults(run=_serve)

    weights = commands.add_parser("weights", help="download the official weights that are missing (and verify them)")
    weights.add_argument("action", choices=["download"])
    weights.add_argument("--sam", action="append", choices=SEGMENTERS, help="segmenter type(s), as SAM_MODEL_TYPE")
    weights.add_argument("--detector", action="append", choices=DETECTORS, help="detector(s) (default: DETECTOR)")
    weights.add_argument("--no-grounding-dino", action="store_true", help="skip the detector's weights")
    weights.add_argument(
        "--video", action="append", choices=VIDEO_MODELS, help="video predictor(s), as VIDEO_MODEL, for video tasks"
    )
    weights.set_defaults(run=_weights)

    worker = commands.add_parser("worker", help="run an inference worker taking jobs from Redis (INFERENCE=queue)")
    worker.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    worker.add_argument(
        "--alive", action="store_true", help="exit 0 if a worker of this host is registered, else 1 (health check)"
    )
    worker.set_defaults(run=_worker)
    for name, help_text in (
        ("preannotate", "pre-annotate a whole Label Studio project (resumable; skips tasks already predicted)"),
        ("encode", "cache the SAM embedding of every task image of a project (resumable; skips cached images)"),
        ("track", "track the keyframe boxes of every video task of a project (resumable; skips tracked tasks)"),
    ):
        run = commands.add_parser(name, help=help_text)
        run.add_argument("--project", type=int, required=True, help="the Label Studio project id")
        if name != "track":  # one video at a time, tracked from its annotation
            run.add_argument("--batch-size", type=int, help="tasks per batch (default: GROUNDING_DINO_BATCH)")
            run.add_argument("--parallel", type=int, help="batches in flight (default: 1; 2 per queue worker)")
            run.add_argument("--skip-annotated", action="store_true", help="leave tasks that have annotations")
        run.add_argument("--page-size", type=int, default=100, help="tasks per Label Studio page")
        run.add_argument("--max-tasks", type=int, help="stop after this many tasks (try a few first)")
        run.set_defaults(run=_project_run)

    predict = commands.add_parser("predict", help="segment what a text prompt names in one image")
    predict.add_argument("image", type=Path)
    predict.add_argument("--text", required=True, help='comma-separated phrases, e.g. "car, wheel"')
    predict.add_argument("--out", type=Path, help="write the overlay (masks, boxes, labels) to this picture file")
    predict.add_argument("--box-threshold", type=float, help="default: BOX_THRESHOLD")
    predict.add_argument("--text-threshold", type=float, help="default: TEXT_THRESHOLD")
    predict.add_argument("--sam-model", choices=SEGMENTERS, help="the segmenter (default: SAM_MODEL_TYPE)")
    predict.add_argument("--detector", choices=DETECTORS, help="default: DETECTOR")
    predict.set_defaults(run=_predict)

    demo = commands.add_parser("demo", help="the Gradio demo page (pip install -r requirements-demo.txt)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=7860)
    demo.set_defaults(run=_demo)

    inbox = commands.add_parser("inbox", help="replay the webhook events a project set aside (see /versions)")
    inbox.add_argument("action", choices=["replay"])
    inbox.add_argument("--project", type=int, required=True, help="the Label Studio project id")
    inbox.add_argument("--wait", type=float, default=3600.0, help="seconds to wait for them to be applied (local)")
    inbox.set_defaults(run=_inbox_replay)

    evaluated = commands.add_parser(
        "evaluate", help="score the segmenter and the project's versions by simulated clicks on its annotations"
    )
    evaluated.add_argument("--project", type=int, required=True, help="the Label Studio project id")
    evaluated.add_argument("--tasks", type=int, default=None, help="at most this many tasks, held-out ones first")
    evaluated.set_defaults(run=_evaluate)

    described = commands.add_parser("settings", help="print the settings in force (secrets left out)")
    described.add_argument("--markdown", action="store_true", help="print docs/configuration.md instead")
    described.set_defaults(run=_settings)

    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    return args.run(args, settings)
