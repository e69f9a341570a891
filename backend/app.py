"""Wires settings, cache, predictor and HTTP routes into one Flask app."""

from __future__ import annotations

import logging

import torch
from flask import Flask

from backend.cache.connection import redis_client
from backend.cache.store import make_store
from backend.config import Settings
from backend.http.routes import create_app
from backend.inference.local import Predictor
from backend.inference.queue import QueuePredictor

log = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )


def configure_process(settings: Settings) -> None:
    """Logging and torch's CPU threads (TORCH_THREADS), alike in every process that may run a model: the web
    tier, a queue worker and the command-line runs."""
    configure_logging(settings.log_level)
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    log.info("torch runs with %d CPU threads (TORCH_THREADS=%d)", torch.get_num_threads(), settings.torch_threads)


def make_predictor(settings: Settings) -> Predictor | QueuePredictor:
    """The models in this process (INFERENCE=local) or on RQ workers (INFERENCE=queue)."""
    if settings.inference == "local":
        return Predictor(settings, make_store(settings.cache_url, settings.memory_cache_bytes))
    if settings.inference == "queue":
        if not settings.redis_url:
            raise ValueError("INFERENCE=queue needs REDIS_URL")
        return QueuePredictor(settings, redis_client(settings.redis_url))
    raise ValueError(f"INFERENCE must be local or queue, not {settings.inference!r}")


def build_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    configure_process(settings)
    app = create_app(settings, make_predictor(settings))
    # Start loading right away, in the background, so the first click does not pay for it.
    app.extensions["predictor"].warm_up()
    return app
