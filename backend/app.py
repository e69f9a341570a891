"""The composition root: builds settings, store, inference and the HTTP app, and sets up each process.

The one module that knows every concrete class. It imports the models (and so torch) only for INFERENCE=local:
the queue-mode web tier runs no model and must start without torch installed (docker/Dockerfile.web).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from flask import Flask

from backend.cache.connection import redis_client
from backend.cache.store import make_store
from backend.config import Settings
from backend.http.server import create_app
from backend.inference.base import Inference
from backend.inference.queue import QueuePredictor
from backend.training.ingest import interrupt_applying

log = logging.getLogger(__name__)
PACKAGE_DIR = Path(__file__).resolve().parent


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )
    warnings.showwarning = log_warning


def log_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None, line=None
) -> None:
    """Warnings through logging: ours at WARNING, a library's (deprecations an operator cannot act on) at DEBUG."""
    ours = Path(filename).resolve().is_relative_to(PACKAGE_DIR)
    logging.getLogger("py.warnings").log(
        logging.WARNING if ours else logging.DEBUG, "%s:%d: %s: %s", filename, lineno, category.__name__, message
    )


def configure_process(settings: Settings, runs_models: bool = True) -> None:
    """Logging, and for a process that runs models torch's CPU threads (TORCH_THREADS): alike in the web tier,
    a queue worker and the command-line runs."""
    configure_logging(settings.log_level)
    if not runs_models:
        return
    from backend.models.registry import apply_torch_threads

    threads = apply_torch_threads(settings.torch_threads)
    log.info("torch runs with %d CPU threads (TORCH_THREADS=%d)", threads, settings.torch_threads)


# What a process is stopped with: a deploy or `docker stop` (TERM), a terminal (INT, QUIT), gunicorn's master when a
# worker overran GUNICORN_TIMEOUT (ABRT).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGABRT)


def announce_stops() -> None:
    """A stop signal first takes back the attempts at the webhook events this process is applying (a stop is no crash
    of the event's making: `training.ingest`), then does what it did before: gunicorn's worker handlers, or the
    default. Called where the app is built, after gunicorn installed its own (its workers load the app after)."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set signal handlers; a test's app

    def handler_for(previous: Callable[[int, FrameType | None], object] | int | None) -> Callable:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            interrupt_applying(f"this process got {signal.Signals(signum).name}")
            if callable(previous):
                previous(signum, frame)
            elif previous != signal.SIG_IGN:  # the default action, which a Python handler replaced
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        return on_stop

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler_for(signal.getsignal(signum)))


def make_predictor(settings: Settings) -> Inference:
    """The models in this process (INFERENCE=local) or on RQ workers (INFERENCE=queue)."""
    if settings.inference == "queue":
        predictor = QueuePredictor(settings, redis_client(settings.redis_url))
        log.info("INFERENCE=queue: jobs go through Redis at %s; the workers cache the embeddings", predictor.store.url)
        return predictor
    from backend.inference.local import Predictor

    return Predictor(settings, make_store(settings.cache_url, settings.memory_cache_bytes))


def build_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    configure_process(settings, runs_models=settings.inference == "local")
    predictor = make_predictor(settings)
    app = create_app(settings, predictor)
    announce_stops()
    # Start loading right away, in the background, so the first click does not pay for it.
    predictor.warm_up()
    return app
