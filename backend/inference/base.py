"""`Inference`, what the HTTP layer and project runs ask of the models wherever they run, and what both of its
implementations share. Nothing here needs torch: the queue-mode web tier imports this, never
`backend.inference.local`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from backend.cache.digests import ImageDigests
from backend.cache.store import ByteStore
from backend.config import Settings
from backend.deadline import NO_LIMIT, TimeLimit
from backend.decoders.serving import ProjectDecoders
from backend.errors import BackendError, PromptError
from backend.images import ImageFetcher
from backend.outcomes import TaskPrediction
from backend.prompts.interactive import ContextPrompts, read_context
from backend.prompts.text import text_query, thresholds_for
from backend.protocol.label_config import ProjectConfig, VideoConfig
from backend.protocol.results import TaskAnswer, region_rules
from backend.protocol.video import VideoObject
from backend.training.service import ActiveLearning

FETCH_THREADS = 8  # image downloads of one batch run side by side; they wait on the network, not the CPU


def video_model_version(settings: Settings) -> str:
    """A video project's model version: the video predictor, and the folder of one's own where VIDEO_CHECKPOINT names
    it. Another predictor is another version, so Label Studio asks again for the tasks the previous one predicted."""
    own = f"@{Path(settings.video_checkpoint).name}" if settings.video_checkpoint else ""
    return f"video-{settings.video_model}{own}"


StepReport = Callable[[int, int], None]  # (decoded frames reached so far, decoded frames in the video)


class Inference(Protocol):
    """The models, in this process (`local.Predictor`) or on queue workers (`queue.QueuePredictor`)."""

    # Read-only to callers, so an implementation may hold a narrower type (QueuePredictor: a ResilientStore).
    @property
    def store(self) -> ByteStore:
        """Small shared state: project-run progress."""

    @property
    def decoders(self) -> ProjectDecoders: ...

    @property
    def learning(self) -> ActiveLearning: ...

    def warm_up(self) -> None:
        """Start whatever loading this inference needs, in the background; returns at once."""

    def status(self) -> dict:
        """What /health, /status and /metrics report of the models or workers."""

    def read_context(self, context: object, config: ProjectConfig) -> ContextPrompts:
        """The smart-tool context, checked in full before any image is fetched."""

    def predict_interactive(
        self,
        image_url: str,
        task_id: object,
        prompts: ContextPrompts,
        project_id: int | None = None,
        config: ProjectConfig | None = None,
    ) -> TaskPrediction:
        """Masks for one task's smart regions."""

    def predict_batch(
        self,
        image_urls: Sequence[object],
        config: ProjectConfig,
        project_id: int | None = None,
        limit: TimeLimit = NO_LIMIT,
    ) -> list[TaskAnswer | BackendError]:
        """Pre-annotation of several tasks, each answered as Label Studio's JSON; a task that fails, or is not
        done within `limit`, gets its error in its place."""

    def parallel_batches(self) -> int:
        """How many pre-annotation batches a project run keeps in flight."""

    def encode_imports(self, project_id: int) -> None:
        """Encode the images of the project's prefetched and, with ENCODE_ON_IMPORT, recorded imported tasks
        (`bookkeeping.imports`) in the background, at a priority below clicks and pre-annotation; returns at once."""

    def encode_batch(self, image_urls: Sequence[object], project_id: int | None = None) -> list[bool | BackendError]:
        """Cache each image's embedding: True where it was cached already, False where it was encoded now, the error
        of an image that could not be fetched or decoded. Each is recorded as `project_id`'s (`EncodedImages`)."""

    def cache_store(self) -> ByteStore:
        """The store the embeddings are cached in, which /status asks which of a project's images it holds."""

    def track_video(
        self,
        video_url: object,
        objects: Sequence[VideoObject],
        config: VideoConfig,
        limit: TimeLimit,
        on_step: StepReport | None = None,
    ) -> list[dict]:
        """One VideoRectangle result per object of a <Video> task, tracked through the video from its keyframes;
        `on_step` is told the frames reached as they are (in this process only: a queue worker's track reports
        nothing until it is done)."""

    def prefetch(self, project_id: int, task_id: int) -> None:
        """Encode the next PREFETCH_TASKS imported tasks after `task_id` in the background, ahead of the other
        imported ones; returns at once."""


class InteractiveFront:
    """What both predictors do before the models run: check the context, skip empty ones and fetch the image.
    Subclasses provide `settings`, `fetcher`, `decoders`, `digests` (in the embedding cache's store) and the model
    half, `predict_for_image`."""

    settings: Settings
    fetcher: ImageFetcher
    decoders: ProjectDecoders
    digests: ImageDigests
    predict_for_image: Callable[..., TaskPrediction]

    def read_context(self, context: object, config: ProjectConfig) -> ContextPrompts:
        """The request's smart-tool context, checked in full against the project before any image is fetched:
        only the step to pixels needs the image, and it can refuse nothing but a turned rectangle reaching out
        of the image."""
        exemplar_control = config.exemplar.name if config.exemplar is not None else None
        prompts = read_context(context, self.settings.max_prompts_per_task, exemplar_control)
        if prompts.exemplars and self.settings.detector != "sam3":
            raise PromptError(
                f"boxes drawn with the exemplar control {exemplar_control!r} ask SAM 3 for every object like them: "
                f"set DETECTOR=sam3 (it is {self.settings.detector!r})",
                422,
            )
        for label in prompts.region_labels:
            config.check_output_label(label)
        region_rules(self.settings, config)  # a bad polygon_tolerance is refused before any work
        if prompts.texts:
            text_query(prompts.texts, config, prompts.text_label)
            thresholds_for(config, self.settings.box_threshold, self.settings.text_threshold)
        return prompts

    def predict_interactive(
        self,
        image_url: str,
        task_id: object,
        prompts: ContextPrompts,
        project_id: int | None = None,
        config: ProjectConfig | None = None,
    ) -> TaskPrediction:
        """Masks for the smart regions of a context read by `read_context`; an empty one gives no objects, not an
        error."""
        if prompts.empty:
            version = self.decoders.current_name(project_id)
            return TaskPrediction(objects=[], image_size=(0, 0), cache_hit=False, model_version=version)
        started = time.perf_counter()
        image = self.fetcher.fetch(image_url)
        fetch_s = time.perf_counter() - started
        if project_id is not None:  # encoding ahead of the project's annotators then knows the image by its URL
            self.digests.remember(image_url, image.digest)
        prediction = self.predict_for_image(image, task_id, prompts, project_id, config)
        prediction.timings["fetch"] = fetch_s
        return prediction
