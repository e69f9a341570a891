"""One training of one project, as a plain function a background thread or a queue worker can call:
`train_project(project_id, settings) -> TrainingResult`.

It streams the project's training set, one annotation at a time, with the image embeddings (from the cache, or
by fetching and encoding the image again) into its examples (`training.examples`: memory does not grow with the
project), holds out whole tasks, fine-tunes the serving decoder, scores both on the held-out masks, and writes a new
version, which serves only if it scored no worse. Two trainings of
one project never overlap: a file lock guards one host, a Redis lock (when REDIS_URL is set) all hosts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

from backend.cache.locks import exclusive, file_lock
from backend.config import Settings
from backend.decoders.versions import VersionStore, parse_pins, pin_for
from backend.errors import CorruptVersion, ImageError, LockBusy
from backend.models.sam import SamSegmenter, decoder_weights, load_decoder_weights, with_decoder_state
from backend.project_files import ProjectFiles, write_atomically
from backend.training.dataset import AnnotationRecord, TrainingSet
from backend.training.examples import TrainingExamples
from backend.training.finetune import FinetuneConfig, evaluate_miou, finetune
from backend.training.ingest import START_TRAINING, Inbox, process_stopping, write_annotation_count
from backend.training.resources import TrainingResources, shared_resources
from backend.training.support import fine_tuning_refusal

log = logging.getLogger(__name__)

MIN_TASKS = 2  # one task at least to learn from and one to check the result on


class TrainingStopped(Exception):
    """The process was told to stop (a deploy's SIGTERM) in the middle of a training."""


def _stop_point() -> None:
    """Between two images or two steps of a training: a process told to stop ends its training here, instead of
    holding the stop up for the rest of it (minutes) until a SIGKILL ended it with the training lost."""
    reason = process_stopping()
    if reason is not None:
        raise TrainingStopped(reason)


@dataclass
class TrainingResult:
    project_id: int
    # "trained", "skipped" (not enough data), "busy" (another training runs), "refused" (a segmenter it cannot
    # fine-tune), "stopped" (the process was told to stop; the training waits in the inbox), "failed"
    status: str
    reason: str = ""
    version: str | None = None
    accepted: bool = False
    metrics: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def finetune_config(settings: Settings) -> FinetuneConfig:
    return FinetuneConfig(
        steps=settings.train_steps,
        batch_size=settings.train_batch_size,
        learning_rate=settings.train_learning_rate,
        correction_rounds=settings.train_correction_rounds,
    )


@contextlib.contextmanager
def training_lock(files: ProjectFiles, settings: Settings) -> Iterator[None]:
    """Raises LockBusy at once if a training of this project holds it, here or on another host."""
    with exclusive(
        files.train_lock, f"sam:train-lock:{files.project_id}", settings.redis_url, settings.train_lock_ttl_s
    ):
        yield


def held_out_tasks(task_ids: list[int], fraction: float) -> set[int]:
    """Whole tasks are held out, so no image is both learnt and judged; which ones depends only on their ids."""
    ranked = sorted(task_ids, key=lambda task: zlib.crc32(str(task).encode()))
    count = min(max(1, round(len(ranked) * fraction)), len(ranked) - 1)
    return set(ranked[:count])


def _collect(
    records: Iterable[AnnotationRecord], resources: TrainingResources, files: ProjectFiles, examples: TrainingExamples
) -> int:
    """Adds each record's masks to `examples`, one record at a time; returns how many records were read. The images'
    features come from the project's feature store; the store keeps only those of the images read here."""
    features = resources.features(files)
    started = time.time()
    annotated: set[str] = set()
    count = 0
    for record in records:
        _stop_point()
        count += 1
        if record.image_digest is not None:
            annotated.add(record.image_digest)
        key = record.image_digest or record.image_url
        if not examples.has_image(key):
            try:
                # Not from the LRU cache: a training there would push out the images encoded ahead of the annotators.
                embedding, digest = resources.embedding_for(features, record.image_url, record.image_digest)
            except ImageError as error:
                log.warning(
                    "project %d annotation %d left out of this training: %s",
                    files.project_id,
                    record.annotation_id,
                    error,
                )
                continue
            annotated.add(digest)
            examples.add_image(key, embedding)
        for region in record.regions:
            try:
                examples.add(record.task_id, key, region.mask)
            except ValueError as error:
                log.warning(
                    "project %d annotation %d region %s left out: %s",
                    files.project_id,
                    record.annotation_id,
                    region.region_id,
                    error,
                )
    removed = features.keep_only(annotated, written_before=started)
    if removed:
        log.info("project %d: removed the stored features of %d images no longer annotated", files.project_id, removed)
    return count


def train_project(
    project_id: int,
    settings: Settings,
    resources: TrainingResources | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainingResult:
    """Train one project now, in this thread; never raises for a busy lock or too little data. Other
    errors are recorded as the project's last training, then raised."""
    files = ProjectFiles(settings.model_dir, project_id)
    try:
        with training_lock(files, settings):
            try:
                result = _train_locked(files, settings, resources or shared_resources(settings), on_step)
            except TrainingStopped as stop:
                # The count of annotations since the last training was reset as it began: the training itself waits
                # in the inbox, for the next process that applies the project's events.
                Inbox(files).record({"action": START_TRAINING, "project": {"id": project_id}})
                log.info("project %d: training stopped (%s); it waits in the inbox as START_TRAINING", project_id, stop)
                return TrainingResult(project_id, "stopped", f"the process was told to stop: {stop}")
            except BaseException as error:
                failed = TrainingResult(project_id, "failed", f"{type(error).__name__}: {error}")
                write_atomically(files.last_training, json.dumps(failed.as_dict()).encode())
                raise
            write_atomically(files.last_training, json.dumps(result.as_dict()).encode())
            return result
    except LockBusy:
        log.info("project %d: a training is already running; this request is left to it", project_id)
        return TrainingResult(project_id, "busy", "another training of this project is running")


def _train_locked(
    files: ProjectFiles,
    settings: Settings,
    resources: TrainingResources,
    on_step: Callable[[int, float], None] | None,
) -> TrainingResult:
    with TrainingExamples() as examples:
        return _train_on(files, settings, resources, on_step, examples)


def _train_on(
    files: ProjectFiles,
    settings: Settings,
    resources: TrainingResources,
    on_step: Callable[[int, float], None] | None,
    examples: TrainingExamples,
) -> TrainingResult:
    project_id = files.project_id
    segmenter = resources.segmenter
    if not isinstance(segmenter, SamSegmenter):
        reason = fine_tuning_refusal(settings) or f"{segmenter.identity} has no mask decoder this backend fine-tunes"
        log.warning("project %d: training refused: %s", project_id, reason)
        return TrainingResult(project_id, "refused", reason)
    started = time.perf_counter()
    store = VersionStore(files)
    store.remove_partial()
    with file_lock(files.ingest_lock):
        write_annotation_count(files, 0)
    annotations = _collect(TrainingSet(files).records(), resources, files, examples)
    tasks = examples.tasks()
    if len(tasks) < MIN_TASKS:
        reason = f"needs masks on at least {MIN_TASKS} tasks (one is held out to check the result); has {len(tasks)}"
        log.info("project %d: training skipped: %s", project_id, reason)
        return TrainingResult(project_id, "skipped", reason)
    held_out = held_out_tasks(tasks, settings.train_held_out_fraction)
    train = examples.of_tasks(set(tasks) - held_out)
    check = examples.of_tasks(held_out)

    versions, _ = store.scan()
    pin = pin_for(parse_pins(settings.model_version_pin), project_id)
    parent, state = None, None
    for candidate in VersionStore.candidates(versions, pin) or []:
        try:
            state = load_decoder_weights(store.load_weights(candidate))
            parent = candidate
            break
        except (CorruptVersion, ValueError) as error:
            log.error("project %d: version %s cannot be trained from, skipped: %s", project_id, candidate.name, error)
    model = with_decoder_state(segmenter.sam, state)
    config = finetune_config(settings)
    log.info(
        "project %d: training from %s on %d masks (%d tasks), %d held out (%d tasks), %d steps",
        project_id,
        parent.name if parent else "the original SAM",
        len(train),
        len(tasks) - len(held_out),
        len(check),
        len(held_out),
        config.steps,
    )
    before = evaluate_miou(model, check)

    def step_done(step: int, loss: float) -> None:
        _stop_point()
        if on_step is not None:
            on_step(step, loss)

    report = finetune(model, train, config, step_done)
    after = evaluate_miou(model, check)
    accepted = after >= before
    metrics = {
        "project": project_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parent": parent.name if parent else "base",
        "held_out_miou_before": round(before, 6),
        "held_out_miou_after": round(after, 6),
        "accepted": accepted,
        "train_masks": len(train),
        "held_out_masks": len(check),
        "held_out_tasks": sorted(held_out),
        "annotations": annotations,
        "steps": report.steps,
        "steps_per_second": round(report.steps_per_second, 3),
        "first_loss": round(report.first_loss, 6),
        "last_loss": round(report.last_loss, 6),
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 2),
    }
    version = store.write(decoder_weights(model), metrics)
    log.info(
        "project %d: wrote %s, held-out mIoU %.3f -> %.3f: %s",
        project_id,
        version.name,
        before,
        after,
        "serves now" if accepted else "kept, not served (worse than the serving decoder)",
    )
    if resources.decoders is not None:
        resources.decoders.serving(project_id, resources.segmenter)  # export the new decoder before a user waits for it
    return TrainingResult(project_id, "trained", version=version.name, accepted=accepted, metrics=version.metrics)
