"""The functions RQ runs inside a worker process, against that process's loaded models.

A worker loads its models once (`install_predictor`); each job reads the image the web tier stored
in Redis by content hash, runs the model half of the prediction and returns plain data. Input
errors come back as values, not exceptions, so that RQ does not retry what can never succeed and
the web tier can answer the right 4xx.
"""

from __future__ import annotations

import logging

from backend.images import FetchedImage, ImageError
from backend.predictor import Predictor, TaskPrediction
from backend.prompts.interactive import PromptError
from backend.protocol.label_config import ConfigError
from backend.training.trainer import train_project

log = logging.getLogger(__name__)

_predictor: Predictor | None = None

IMAGE_KEY = "sam:img:{digest}"


class InputError(Exception):
    """A job's input was refused; carries the HTTP status the web tier answers with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, status)  # both in args, so the error survives RQ's pickling
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


def install_predictor(predictor: Predictor) -> None:
    """Called once by the worker before it takes jobs."""
    global _predictor
    _predictor = predictor


def _image(digest: str) -> FetchedImage:
    assert _predictor is not None, "the worker installs its predictor before taking jobs"
    data = _predictor.store.get(IMAGE_KEY.format(digest=digest))
    if data is None:
        # The web tier stores the image before enqueuing; only an expired or flushed key lands here.
        raise InputError("the image is no longer in Redis; send the request again", 503)
    return FetchedImage(url=f"redis:{digest}", data=data)


def interactive(
    digest: str, task_id: object, context: object, project_id: int | None = None
) -> TaskPrediction | InputError:
    assert _predictor is not None
    try:
        return _predictor.predict_for_image(_image(digest), task_id, context, project_id)
    except (ImageError, PromptError, ConfigError) as error:
        log.warning("job for image %s refused: %s", digest[:12], error)
        return InputError(str(error), getattr(error, "status", 422))
    except InputError as error:
        return error


def learn(project_id: int) -> dict | None:
    """Apply a project's recorded webhook events and, if that makes a training due, train it here."""
    assert _predictor is not None
    if not _predictor.learning.apply(project_id):
        return None
    return train_project(project_id, _predictor.settings, _predictor.training_resources()).as_dict()
