"""`python -m backend evaluate --project ID`: the configured segmenter and each of the project's accepted versions,
scored by the simulated annotator (`training.evaluation`) on the project's own annotations, held-out tasks first,
and written to `MODEL_DIR/<project>/reports/evaluation-<time>.md`, `.json` and `.png` (IoU against clicks).

Each annotation's scores are kept as they are made (`training.resume`): a run interrupted and started again with
the same models and settings scores only the annotations not yet scored."""

from __future__ import annotations

import functools
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

import numpy as np

from backend.config import Settings
from backend.decoders.versions import VersionStore, public_name
from backend.errors import BackendError, CorruptVersion, ImageError
from backend.images import decode_image
from backend.models.base import FineTunable, Segmenter
from backend.project_files import EVALUATION_PREFIX, ProjectFiles, write_atomically
from backend.training.dataset import AnnotationRecord, TrainingSet
from backend.training.detection_scores import DetectorReport
from backend.training.detector_evaluation import AnnotationDetector, project_detector
from backend.training.evaluation import (
    MAX_CLICKS,
    REPORTED_CLICKS,
    TARGETS,
    markdown_table,
    model_reports,
    score_image,
    time_encode,
)
from backend.training.features import TrainingFeatures
from backend.training.installed import InstalledSegmenter, installed_segmenters
from backend.training.plot import iou_curves_png
from backend.training.resources import TrainingResources
from backend.training.resume import Kept, PartialScores, remove_partial_scores, run_key
from backend.training.trainer import held_out_tasks

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0

# Told after each annotation: how many are done (kept from an interrupted run or scored), of how many, and how many
# of them this run scored.
Progress = Callable[[int, int, int], None]


class Candidate(NamedTuple):
    """A model to evaluate: its name in the report, the model, and what identifies its weights."""

    name: str
    segmenter: Segmenter
    weights: str


def models_to_evaluate(project_id: int, settings: Settings, segmenter: Segmenter) -> list[Candidate]:
    """The configured segmenter, then each version of the project that was accepted (served, or served once), oldest
    first; a version that does not load is left out with an error in the log."""
    models = [Candidate(settings.base_model_version, segmenter, segmenter.identity)]
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
        name = public_name(settings.base_model_version, project_id, version)
        models.append(Candidate(name, tuned, f"{segmenter.identity}+{version.metrics['weights_sha256']}"))
    return models


def chosen_tasks(training_set: TrainingSet, fraction: float, limit: int | None) -> list[int]:
    """The annotated tasks to evaluate: the held-out ones (never trained on) first, then the rest, at most `limit`."""
    tasks = sorted({record.task_id for record in training_set.records()})
    if len(tasks) < 2:
        return tasks
    held_out = held_out_tasks(tasks, fraction)
    ordered = sorted(held_out) + [task for task in tasks if task not in held_out]
    return ordered[:limit] if limit is not None else ordered


class ProgressLine:
    """A log line at most every `every_s`: annotations done of the total, and the time left at this run's pace
    (annotations kept from an interrupted run take none)."""

    def __init__(self, project_id: int, every_s: float = PROGRESS_EVERY_S) -> None:
        self.project_id = project_id
        self.every_s = every_s
        self.started = self.last_said = time.monotonic()

    def __call__(self, done: int, total: int, scored: int) -> None:
        now = time.monotonic()
        if now - self.last_said < self.every_s:
            return
        self.last_said = now
        elapsed = now - self.started
        left = f"about {(total - done) * elapsed / scored:.0f} s left" if scored else "time left not known yet"
        log.info(
            "project %d: evaluated %d of %d annotations (%d kept from an earlier run) in %.0f s, %s",
            self.project_id,
            done,
            total,
            done - scored,
            elapsed,
            left,
        )


@dataclass
class Passes:
    """The evaluation's passes over the annotations (the configured encoder's models, then each installed model):
    the scores kept so far, and the progress over all of them."""

    project_id: int
    records: list[AnnotationRecord]
    partial: PartialScores
    progress: Progress
    count: int
    scored: int = 0  # (model, annotation) scorings this run made

    def run(
        self, score: Callable[[AnnotationRecord, list[Kept]], Kept], turn: int = 0, model: str | None = None
    ) -> list[Kept]:
        """Each annotation's kept scores, else `score`'s (told those before it), then kept; an annotation whose image
        fails is left out with a warning."""
        results: list[Kept] = []
        total = len(self.records) * self.count
        for done, record in enumerate(self.records, turn * len(self.records) + 1):
            kept = self.partial.get(record, model)
            if kept is None:
                try:
                    kept = score(record, results)
                except ImageError as error:
                    log.warning(
                        "project %d annotation %d left out of the evaluation%s: %s",
                        self.project_id,
                        record.annotation_id,
                        f" of {model}" if model else "",
                        error,
                    )
                    self.progress(done, total, self.scored)
                    continue
                self.partial.put(record, kept, model)
                self.scored += 1
            results.append(kept)
            self.progress(done, total, self.scored)
        return results


def evaluate_project(
    project_id: int,
    settings: Settings,
    resources: TrainingResources,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """Run the evaluation and write its report; returns the report as written to JSON. `progress` is told after
    each annotation (by default, a log line every PROGRESS_EVERY_S)."""
    files = ProjectFiles(settings.model_dir, project_id)
    training_set = TrainingSet(files)
    tasks = set(chosen_tasks(training_set, settings.train_held_out_fraction, limit))
    records = [record for record in training_set.records() if record.task_id in tasks and record.regions]
    if not records:
        raise ValueError(f"project {project_id} has no annotations with masks to evaluate on ({files.annotations})")
    models = models_to_evaluate(project_id, settings, resources.segmenter)
    protocol = {
        "max_clicks": MAX_CLICKS,
        "reported_clicks": list(REPORTED_CLICKS),
        "targets": list(TARGETS),
        "max_image_pixels": settings.max_image_pixels,
    }
    labels = sorted({region.label for record in records for region in record.regions})
    detection = project_detector(settings, labels, project_id)
    protocol["detector"] = detection.identity if detection is not None else None
    partial = PartialScores(files.reports, run_key([(model.name, model.weights) for model in models], protocol))
    installed = installed_segmenters(settings)
    passes = Passes(project_id, records, partial, progress or ProgressLine(project_id), 1 + len(installed))
    started = time.monotonic()
    features = resources.features(files)

    def score(record: AnnotationRecord, before: list[Kept]) -> Kept:
        # The encode is timed once, on the first image scored; a resumed run reuses the time kept with the scores.
        encode_seconds = before[0].encode_seconds if before else None
        return _score(record, models, detection, resources, features, settings.max_image_pixels, encode_seconds)

    results = passes.run(score)
    encode_seconds = results[0].encode_seconds if results else None
    reports = model_reports([model.name for model in models], [kept.scores for kept in results], encode_seconds)
    for turn, other in enumerate(installed, 1):
        try:
            own = passes.run(
                _alone(other, resources, settings.max_image_pixels), turn, f"{other.name}-{other.fingerprint}"
            )
        except (BackendError, OSError, ValueError) as error:
            log.error("project %d: %s left out of the evaluation: %s", project_id, other.name, error)
            continue
        encodes = [kept.encode_seconds for kept in own]
        median = statistics.median(encodes) if encodes else None  # its encodes differ in size: the median one
        reports += model_reports([other.name], [kept.scores for kept in own], median)
    detectors = []
    if detection is not None:
        detector_report = DetectorReport(detection.detector.name)
        for kept in results:
            detector_report.add(kept.detections or {})
        detectors.append(
            {
                **detector_report.as_dict(),
                "box_threshold": detection.thresholds.box,
                "text_threshold": detection.thresholds.text,
            }
        )
    when = datetime.now(UTC)
    markdown = markdown_table(reports)
    if detectors:
        markdown += "\n\n" + detector_table(detectors)
    report: dict = {
        "project": project_id,
        "finished_at": when.isoformat(timespec="seconds"),
        "tasks": len(tasks),
        "annotations": len(results),
        "scored_now": passes.scored,  # the others were kept from an interrupted run
        "max_clicks": MAX_CLICKS,
        "seconds": round(time.monotonic() - started, 1),
        "models": [model.as_dict() for model in reports],
        "detectors": detectors,
        "markdown": markdown,
    }
    stem = files.reports / f"{EVALUATION_PREFIX}{when:%Y%m%dT%H%M%SZ}"
    plot = stem.with_suffix(".png")
    title = f"project {project_id}: {len(tasks)} tasks, {when:%Y-%m-%d %H:%M} UTC"
    write_atomically(plot, iou_curves_png(report["models"], title))
    write_atomically(stem.with_suffix(".md"), f"{markdown}\n\n![mean IoU against clicks]({plot.name})\n".encode())
    # The JSON last: GET /evaluate serves the newest JSON, whose table and plot are then already beside it.
    write_atomically(stem.with_suffix(".json"), json.dumps(report, indent=1).encode())
    remove_partial_scores(files.reports)
    report["written_to"] = [str(stem.with_suffix(suffix)) for suffix in (".json", ".md", ".png")]
    return report


def _score(
    record: AnnotationRecord,
    models: list[Candidate],
    detection: AnnotationDetector | None,
    resources: TrainingResources,
    features: TrainingFeatures,
    max_image_pixels: int,
    encode_seconds: float | None,
) -> Kept:
    """One annotation scored by every model and the detector; the encode is timed when `encode_seconds` is None."""
    embedding, _ = resources.embedding_for(features, record.image_url, record.image_digest)

    @functools.cache
    def pixels() -> np.ndarray:  # fetched at most once, and only when the encode is timed or a detector reads it
        return decode_image(resources.fetcher.fetch(record.image_url).data, max_image_pixels)

    masks = [region.mask for region in record.regions if region.shape == tuple(embedding.original_size)]
    scores = score_image([model.segmenter for model in models], embedding, masks)
    seconds = encode_seconds if encode_seconds is not None else time_encode(resources.segmenter, pixels())
    return Kept(scores, seconds, detection.counts(pixels(), record.regions) if detection is not None else None)


def _alone(
    other: InstalledSegmenter, resources: TrainingResources, max_image_pixels: int
) -> Callable[[AnnotationRecord, list[Kept]], Kept]:
    """What scores one annotation by an installed model that encodes the image itself, this encode timed. The model
    is loaded at its first annotation left to score (none when all were kept), and held by this pass alone, so
    that one installed model is in memory at a time."""
    loaded: list[Segmenter] = []

    def score(record: AnnotationRecord, before: list[Kept]) -> Kept:
        if not loaded:
            loaded.append(other.load())
        return _score_alone(record, loaded[0], resources, max_image_pixels)

    return score


def _score_alone(
    record: AnnotationRecord, segmenter: Segmenter, resources: TrainingResources, max_image_pixels: int
) -> Kept:
    pixels = decode_image(resources.fetcher.fetch(record.image_url).data, max_image_pixels)
    started = time.perf_counter()
    embedding = segmenter.encode(pixels)
    seconds = time.perf_counter() - started
    masks = [region.mask for region in record.regions if region.shape == tuple(embedding.original_size)]
    return Kept(score_image([segmenter], embedding, masks), seconds, None)


def detector_table(detectors: list[dict]) -> str:
    """Each detector's precision and recall, overall and per label, as a Markdown table."""
    lines = ["| detector | label | precision | recall | found | false | missed |", "|---|---|---|---|---|---|---|"]
    for detector in detectors:
        for label, counts in [("all", detector["overall"]), *detector["labels"].items()]:
            cells = [counts["precision"], counts["recall"], counts["true_positives"], counts["false_positives"]]
            shown = ["" if cell is None else str(cell) for cell in [*cells, counts["missed"]]]
            lines.append(f"| {detector['model']} | {label} | " + " | ".join(shown) + " |")
    return "\n".join(lines)
