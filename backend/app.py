"""Wires settings, cache, predictor and HTTP routes into one Flask app."""

from __future__ import annotations

import logging

import torch
from flask import Flask

from backend.cache.store import make_store, redis_client
from backend.config import Settings
from backend.predictor import Predictor
from backend.protocol.server import create_app
from backend.worker.client import QueuePredictor


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )


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
    configure_logging(settings.log_level)
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    app = create_app(settings, make_predictor(settings))
    # Start loading right away, in the background, so the first click does not pay for it.
    app.extensions["predictor"].warm_up()
    return app
