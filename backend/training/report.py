"""`python -m backend evaluate --project ID`: the configured segmenter and each of the project's accepted versions,
scored by the simulated annotator (`training.evaluation`) on the project's own annotations, held-out tasks first,
and written to `MODEL_DIR/<project>/reports/evaluation-<time>.md`, `.json` and `.png` (IoU against clicks)."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

from backend.config import Settings
from backend.decoders.versions import VersionStore, public_name
from backend.errors import CorruptVersion, ImageError
from backend.models.base import FineTunable, Segmenter
from backend.project_files import EVALUATION_PREFIX, ProjectFiles, write_atomically
from backend.training.dataset import TrainingSet
from backend.training.evaluation import MAX_CLICKS, EvaluatedImage, evaluate, markdown_table
from backend.training.plot import iou_curves_png
from backend.training.resources import TrainingResources
from backend.training.trainer import held_out_tasks

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0


def models_to_evaluate(project_id: int, settings: Settings, segmenter: Segmenter) -> list[tuple[str, Segmenter]]:
    """The configured segmenter, then each version of the project that was accepted (served, or served once), oldest
    first; a version that does not load is left out with an error in the log."""
    models = [(settings.base_model_version, segmenter)]
    if not isinstance(segmenter, FineTunable):
        return models
    store = VersionStore(ProjectFiles(settings.model_dir, project_id))
    versions, _ = store.scan()
    for version in versions:
        if not version.accepted:
            continue
        try:
            tuned = segmenter.with_decoder_weights(store.load_weights(version))
        except (CorruptVersion, ValueError) as error:
            log.error("project %d: version %s left out of the evaluation: %s", project_id, version.name, error)
            continue
        models.append((public_name(settings.base_model_version, project_id, version), tuned))
    return models


def chosen_tasks(training_set: TrainingSet, fraction: float, limit: int | None) -> list[int]:
    """The annotated tasks to evaluate: the held-out ones (never trained on) first, then the rest, at most `limit`."""
    tasks = sorted({record.task_id for record in training_set.records()})
    if len(tasks) < 2:
        return tasks
    held_out = held_out_tasks(tasks, fraction)
    ordered = sorted(held_out) + [task for task in tasks if task not in held_out]
    return ordered[:limit] if limit is not None else ordered


def evaluated_images(files: ProjectFiles, resources: TrainingResources, tasks: set[int]) -> Iterator[EvaluatedImage]:
    """Each annotation of `tasks` with its embedding (feature store, cache, or encoded without caching) and masks,
    one at a time; an annotation whose image is gone or changed is left out with a warning."""
    features = resources.features(files)
    for record in TrainingSet(files).records():
        if record.task_id not in tasks or not record.regions:
            continue
        try:
            embedding, _ = resources.embedding_for(features, record.image_url, record.image_digest)
        except ImageError as error:
            log.warning(
                "project %d annotation %d left out of the evaluation: %s", files.project_id, record.annotation_id, error
            )
            continue
        yield EvaluatedImage(
            embedding,
            [region.mask for region in record.regions if region.shape == tuple(embedding.original_size)],
            functools.partial(_image_bytes, resources, record.image_url),
        )


def _image_bytes(resources: TrainingResources, url: str) -> bytes:
    return resources.fetcher.fetch(url).data


def evaluate_project(
    project_id: int, settings: Settings, resources: TrainingResources, limit: int | None = None
) -> dict:
    """Run the evaluation and write its report; returns the report as written to JSON."""
    files = ProjectFiles(settings.model_dir, project_id)
    training_set = TrainingSet(files)
    tasks = chosen_tasks(training_set, settings.train_held_out_fraction, limit)
    if not tasks:
        raise ValueError(f"project {project_id} has no annotations with masks to evaluate on ({files.annotations})")
    models = models_to_evaluate(project_id, settings, resources.segmenter)
    started = time.monotonic()
    last_said = started

    def progress(done: int) -> None:
        nonlocal last_said
        if time.monotonic() - last_said >= PROGRESS_EVERY_S:
            log.info("project %d: evaluated %d annotations in %.0f s", project_id, done, time.monotonic() - started)
            last_said = time.monotonic()

    reports = evaluate(models, evaluated_images(files, resources, set(tasks)), settings.max_image_pixels, progress)
    when = datetime.now(UTC)
    markdown = markdown_table(reports)
    report: dict = {
        "project": project_id,
        "finished_at": when.isoformat(timespec="seconds"),
        "tasks": len(tasks),
        "max_clicks": MAX_CLICKS,
        "seconds": round(time.monotonic() - started, 1),
        "models": [model.as_dict() for model in reports],
        "markdown": markdown,
    }
    stem = files.reports / f"{EVALUATION_PREFIX}{when:%Y%m%dT%H%M%SZ}"
    plot = stem.with_suffix(".png")
    title = f"project {project_id}: {len(tasks)} tasks, {when:%Y-%m-%d %H:%M} UTC"
    write_atomically(plot, iou_curves_png(report["models"], title))
    write_atomically(stem.with_suffix(".md"), f"{markdown}\n\n![mean IoU against clicks]({plot.name})\n".encode())
    # The JSON last: GET /evaluate serves the newest JSON, whose table and plot are then already beside it.
    write_atomically(stem.with_suffix(".json"), json.dumps(report, indent=1).encode())
    report["written_to"] = [str(stem.with_suffix(suffix)) for suffix in (".json", ".md", ".png")]
    return report
