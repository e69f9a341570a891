"""What both kinds of inference share, and nothing that needs torch: the queue-mode web tier imports this,
never `backend.inference.local`."""

from __future__ import annotations

import time
from collections.abc import Callable

from backend.decoders.serving import ProjectDecoders
from backend.images import ImageFetcher
from backend.outcomes import TaskPrediction
from backend.protocol.label_config import ProjectConfig

FETCH_THREADS = 8  # image downloads of one batch run side by side; they wait on the network, not the CPU


class InteractiveFront:
    """What both predictors do before the models run: skip empty contexts and fetch the image.
    Subclasses provide `fetcher`, `decoders` and the model half, `predict_for_image`."""

    fetcher: ImageFetcher
    decoders: ProjectDecoders
    predict_for_image: Callable[..., TaskPrediction]

    def predict_interactive(
        self,
        image_url: str,
        task_id: object,
        context: object,
        project_id: int | None = None,
        config: ProjectConfig | None = None,
    ) -> TaskPrediction:
        """Masks for the smart regions in `context`; an empty context gives no objects, not an error."""
        if not context:
            version = self.decoders.current_name(project_id)
            return TaskPrediction(objects=[], image_size=(0, 0), cache_hit=False, model_version=version)
        started = time.perf_counter()
        image = self.fetcher.fetch(image_url)
        fetch_s = time.perf_counter() - started
        prediction = self.predict_for_image(image, task_id, context, project_id, config)
        prediction.timings["fetch"] = fetch_s
        return prediction
