"""The functions RQ runs inside a worker process, against that process's loaded models.

A worker loads its models once (`install_predictor`); each job reads the image the web tier stored
in Redis by content hash, runs the model half of the prediction and returns plain data. Input
errors come back as values, not exceptions, so that RQ does not retry what can never succeed and
the web tier can answer the right 4xx.
"""

from __future__ import annotations

import logging

from backend.images import FetchedImage, ImageError, ImageFetcher
from backend.predictor import Predictor, TaskPrediction
from backend.prompts.interactive import PromptError
from backend.protocol.label_config import ConfigError, ProjectConfig
from backend.training.trainer import train_project

log = logging.getLogger(__name__)

_predictor: Predictor | None = None

IMAGE_KEY = "sam:img:{digest}"
STORED_PREFIX = "redis-image:"


class InputError(Exception):
    """A job's input was refused; carries the HTTP status the web tier answers with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, status)  # both in args, so the error survives RQ's pickling
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


def stored_url(digest: str) -> str:
    """How a job names an image the web tier stored in Redis."""
    return STORED_PREFIX + digest


class StoredImageFetcher(ImageFetcher):
    """The worker's fetcher: images the web tier stored in Redis, by content hash."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__(predictor.settings)
        self.store = predictor.store

    def fetch(self, url: str) -> FetchedImage:
        if not isinstance(url, str) or not url.startswith(STORED_PREFIX):
            return super().fetch(url)
        digest = url[len(STORED_PREFIX) :]
        data = self.store.get(IMAGE_KEY.format(digest=digest))
        if data is None:
            # The web tier stores the image before enqueuing; only an expired or flushed key lands here.
            raise InputError("the image is no longer in Redis; send the request again", 503)
        return FetchedImage(url=url, data=data)


def install_predictor(predictor: Predictor) -> None:
    """Called once by the worker before it takes jobs."""
    global _predictor
    predictor.fetcher = StoredImageFetcher(predictor)
    _predictor = predictor


def _refusal(error: Exception) -> InputError:
    log.warning("job refused: %s", error)
    return error if isinstance(error, InputError) else InputError(str(error), getattr(error, "status", 422))


def interactive(
    digest: str, task_id: object, context: object, project_id: int | None = None, config: ProjectConfig | None = None
) -> TaskPrediction | InputError:
    assert _predictor is not None, "the worker installs its predictor before taking jobs"
    try:
        image = _predictor.fetcher.fetch(stored_url(digest))
        return _predictor.predict_for_image(image, task_id, context, project_id, config)
    except (ImageError, PromptError, ConfigError, InputError) as error:
        return _refusal(error)


def preannotate(
    image_urls: list[str], config: ProjectConfig, project_id: int | None = None
) -> list[TaskPrediction | Exception] | InputError:
    assert _predictor is not None, "the worker installs its predictor before taking jobs"
    try:
        return _predictor.predict_batch(image_urls, config, project_id)
    except (PromptError, ConfigError, InputError) as error:
        return _refusal(error)


def learn(project_id: int) -> dict | None:
    """Apply a project's recorded webhook events and, if that makes a training due, train it here."""
    assert _predictor is not None
    if not _predictor.learning.apply(project_id):
        return None
    return train_project(project_id, _predictor.settings, _predictor.training_resources()).as_dict()
