"""Wires settings, cache, predictor and HTTP routes into one Flask app."""

from __future__ import annotations

import logging

import torch
from flask import Flask

from backend.cache.store import make_store
from backend.config import Settings
from backend.predictor import Predictor
from backend.protocol.server import create_app


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )


def build_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    predictor = Predictor(settings, make_store(settings.redis_url, settings.memory_cache_bytes))
    app = create_app(settings, predictor)
    app.extensions["predictor"] = predictor
    # Start loading right away, in the background, so the first click does not pay for it.
    predictor.models.start()
    # Apply webhook events a previous process recorded but did not get to.
    predictor.learning.start()
    return app
