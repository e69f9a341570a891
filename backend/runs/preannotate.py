"""Whole-project pre-annotation: page through a Label Studio project's tasks, predict them in batches
with GroundingDINO + SAM (which caches each image's SAM embedding on the way, so later clicks are
instant), and push the predictions back with the model version that made them.

A run can stop at any point and start again without duplicates: a task already holding a prediction
of the serving model version is skipped. One run per project at a time (a lock on this host and, with
Redis, on all). A task that cannot be predicted gets no prediction, so the next run tries it again,
and its error is written to MODEL_DIR/<project>/preannotate-errors.jsonl and counted in the progress.
`python -m backend preannotate` runs it in the foreground; POST /preannotate in the web tier's background.

A "Retrieve predictions" batch that cannot finish within PREDICT_DEADLINE hands the tasks it did not answer to the
same run (`BackgroundRuns.hand_over`): they wait in MODEL_DIR/<project>/handed-over.json (`HandedOverTasks`), a run
that is going on takes them after its own tasks, and a run that ended or a restarted process starts one that takes
only them. Each task's predictions are read again just before its batch, so a task predicted meanwhile is skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from backend.cache.locks import exclusive
from backend.cache.store import ByteStore
from backend.config import Settings
from backend.errors import (
    BackendError,
    ConfigError,
    ImageError,
    InferenceUnavailable,
    LabelStudioUnavailable,
    LockBusy,
    ModelNotReady,
    ProjectApiError,
    PromptError,
)
from backend.inference.base import Inference
from backend.project_files import ProjectFiles
from backend.protocol.label_config import ProjectConfig, parse_label_config
from backend.protocol.project_api import ProjectApi, ProjectTask
from backend.protocol.results import TaskAnswer
from backend.runs.handed_over import HandedOverTasks

log = logging.getLogger(__name__)

LOCK_TTL_S = 60.0  # a killed run frees its project this soon
UNAVAILABLE_RETRIES = 3  # a batch that finds the models loading or no worker alive waits and tries again
UNAVAILABLE_PAUSE_S = 10.0
PROGRESS_TTL_S = 7 * 24 * 3600
PROGRESS_KEY = "sam:preannotate:{project}"
STOP_KEY = "sam:preannotate:{project}:stop"
GOING_ON = ("starting", "running")  # the states of a run that a stop request reaches


@dataclass
class RunProgress:
    """What a run has done so far; `state` is starting, running, stopped, finished, failed or busy."""

    project: int
    model_version: str = ""
    state: str = "starting"
    total: int = 0  # tasks in the project when the run started
    predicted: int = 0  # predictions stored by this run (an encoding run: images encoded or found cached)
    skipped: int = 0  # tasks that already had a prediction of this model version (or an annotation, if asked)
    failed: int = 0  # tasks whose error was recorded
    message: str = ""
    resumable: bool = False  # a failed run's cause may pass (Label Studio or the workers did not answer)
    started_at: float = field(default_factory=time.time)
    busy_s: float = 0.0  # time spent on tasks that needed work, the base of the rate
    # A video tracking run's task being tracked, and the decoded frames its track has reached of the video's.
    task: int | None = None
    frames_done: int = 0
    frames_total: int = 0

    @property
    def rate(self) -> float:
        """Tasks predicted (or failed) per second of work; skipped tasks cost nothing and do not count."""
        return (self.predicted + self.failed) / self.busy_s if self.busy_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        left = self.total - self.predicted - self.failed - self.skipped
        return max(left, 0) / self.rate if self.rate > 0 else None

    def as_dict(self) -> dict:
        return {**asdict(self), "rate_per_s": round(self.rate, 3), "eta_s": self.eta_s}


@dataclass
class RunOptions:
    page_size: int = 100  # tasks per Label Studio page
    batch_size: int = 4  # tasks per prediction batch (one GroundingDINO pass, one queue job)
    parallel: int = 1  # batches in flight at once: more than one only helps with several queue workers
    max_tasks: int | None = None  # stop after submitting this many tasks (try a project on a few first)
    skip_annotated: bool = False
    handed_over_only: bool = False  # only the tasks a /predict batch handed over (`HandedOverTasks`), not the project


class ProjectRun:
    """One pre-annotation run of one project; `run()` blocks until it finished, stopped or failed. The run's
    skeleton (claim, pages, batches in flight, progress, stop) is shared with other whole-project runs, which
    subclass it and override the class names and `_needs_work`, `_work` and `_store` (`runs.encode.EncodeRun`), and
    what it reads and makes (`waiting`, `_label_config`, `_model_version`: `runs.video.VideoTrackRun`)."""

    KIND = "pre-annotation"  # in log lines and messages
    ROUTE = "/preannotate"  # POST starts a run of ?project=, GET reports its progress, DELETE stops it
    LOCK_KEY = "sam:preannotate-lock:{project}"
    PROGRESS_KEY = PROGRESS_KEY
    STOP_KEY = STOP_KEY

    def __init__(
        self,
        project_id: int,
        predictor: Inference,
        api: ProjectApi,
        settings: Settings,
        options: RunOptions,
        report: Callable[[RunProgress], None] = lambda progress: None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.project_id = project_id
        self.predictor = predictor
        self.api = api
        self.settings = settings
        self.options = options
        self.report = report
        self.should_stop = should_stop
        self.files = ProjectFiles(settings.model_dir, project_id)
        self.progress = RunProgress(project_id)
        self._submitted = 0
        self._work_started: float | None = None
        self._left_undone = 0  # tasks a stop cut short in the middle of their work
        self.attempted: set[int] = set()  # task ids this run predicted, skipped or recorded an error for

    def claim(self) -> contextlib.AbstractContextManager[None]:
        """The project's one run at a time, against every thread and process of this host and (with Redis) every
        host; `LockBusy` at once if another run holds it."""
        return exclusive(
            self.lock_file(), self.LOCK_KEY.format(project=self.project_id), self.settings.redis_url, LOCK_TTL_S
        )

    def lock_file(self) -> Path:
        return self.files.preannotate_lock

    def errors_file(self) -> Path:
        return self.files.preannotate_errors

    @classmethod
    def default_options(cls, settings: Settings, predictor: Inference) -> RunOptions:
        """A run's options unless its request says otherwise: batches as GroundingDINO takes them, as many in flight
        as the predictor runs at once."""
        return RunOptions(batch_size=settings.grounding_dino_batch, parallel=predictor.parallel_batches())

    @classmethod
    def waiting(cls, files: ProjectFiles) -> HandedOverTasks | None:
        """The tasks /predict batches handed to this kind of run in a project; None for a kind that takes none."""
        return HandedOverTasks(files.handed_over)

    def handed_over(self) -> HandedOverTasks | None:
        return self.waiting(self.files)

    def run(self) -> RunProgress:
        """Claim the project, then run; a project another run holds ends this one as busy."""
        try:
            with self.claim():
                return self.run_claimed()
        except LockBusy:
            self._end("busy", f"another {self.KIND} run of this project is going on")
            return self.progress

    def run_claimed(self) -> RunProgress:
        """The run itself, by the holder of `claim()`."""
        try:
            self._run_locked()
        except (ProjectApiError, ConfigError, PromptError, ImageError, ModelNotReady) as error:
            self.progress.resumable = isinstance(error, (LabelStudioUnavailable, InferenceUnavailable))
            self._end("failed", str(error))
        except Exception as error:  # the run ends visibly, whatever went wrong
            log.exception("project %d: %s run failed", self.project_id, self.KIND)
            self._end("failed", f"{type(error).__name__}: {error}")
        return self.progress

    def _end(self, state: str, message: str = "") -> None:
        self.progress.state, self.progress.message = state, message
        log.log(
            logging.WARNING if state in ("failed", "busy") else logging.INFO,
            "project %d: %s %s (%d done, %d skipped, %d failed)%s",
            self.project_id,
            self.KIND,
            state,
            self.progress.predicted,
            self.progress.skipped,
            self.progress.failed,
            f": {message}" if message else "",
        )
        self.report(self.progress)

    def _run_locked(self) -> None:
        project = self.api.project(self.project_id)
        config = self._label_config(project.label_config)
        version = self._model_version()
        self.progress.total = 0 if self.options.handed_over_only else project.task_count
        self.progress.model_version = version
        self.progress.state = "running"
        self.report(self.progress)
        log.info(
            "project %d (%s): %s of %s as %s",
            self.project_id,
            project.title,
            self.KIND,
            "the tasks handed over" if self.options.handed_over_only else f"{project.task_count} tasks",
            version,
        )
        in_flight: dict[Future, list[ProjectTask]] = {}
        with ThreadPoolExecutor(max_workers=max(self.options.parallel, 1), thread_name_prefix="preannotate") as pool:
            for batch in self._batches_to_do(config, version):
                if self.should_stop():
                    break
                while len(in_flight) >= max(self.options.parallel, 1):
                    self._collect(in_flight, version)
                if self._work_started is None:
                    self._work_started = time.monotonic()
                in_flight[pool.submit(self._work, batch, config)] = batch
            stopped = self.should_stop()
            # Batches already computing are finished and stored even when stopping: their work is not thrown away.
            while in_flight:
                self._collect(in_flight, version)
        if stopped or self._left_undone or self._limit_reached():
            self._end("stopped", "stopped on request" if stopped else f"stopped after {self._submitted} tasks (limit)")
        else:
            self._end("finished")

    def _limit_reached(self) -> bool:
        return self.options.max_tasks is not None and self._submitted >= self.options.max_tasks

    def _batches_to_do(self, config: ProjectConfig, version: str) -> Iterator[list[ProjectTask]]:
        """Tasks without a prediction of `version`, `batch_size` at a time, up to `max_tasks`: the project's (unless
        `handed_over_only`), then those handed over and not yet taken."""
        if not self.options.handed_over_only:
            yield from self._in_batches(self.api.tasks(self.project_id, self.options.page_size), version)
        waiting = self.handed_over()
        while waiting is not None and not self._limit_reached() and not self.should_stop():
            task_ids = [task_id for task_id in waiting.ids() if task_id not in self.attempted]
            if not task_ids:
                return
            self.progress.total += len(task_ids)
            # One at a time, just before its batch: a task predicted since it was handed over is skipped.
            yield from self._in_batches(self._current(waiting.tasks(), task_ids), version)

    def _current(self, waiting: dict[int, dict], task_ids: list[int]) -> Iterator[ProjectTask]:
        for task_id in task_ids:
            if task_id in waiting:
                yield self._waiting_task(task_id, waiting[task_id], self.api.prediction_versions(task_id))

    def _waiting_task(self, task_id: int, handed_over: dict, prediction_versions: tuple[str, ...]) -> ProjectTask:
        """A handed-over task as `HandedOverTasks` keeps it (its data)."""
        return ProjectTask(task_id, handed_over, prediction_versions, is_labeled=False)

    def _in_batches(self, tasks: Iterator[ProjectTask], version: str) -> Iterator[list[ProjectTask]]:
        batch: list[ProjectTask] = []
        for task in tasks:
            self.attempted.add(task.id)
            if not self._needs_work(task, version):
                self.progress.skipped += 1
                self._settled([task.id])
                continue
            if self._limit_reached() or self.should_stop():
                self.attempted.discard(task.id)
                break  # the tasks already in `batch` are still worked
            batch.append(task)
            self._submitted += 1
            if len(batch) >= self.options.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _settled(self, task_ids: list[int]) -> None:
        """These tasks are done with (predicted, skipped or failed): none of them waits as handed over any more."""
        waiting = self.handed_over()
        if waiting is not None:
            waiting.discard(task_ids)

    def _needs_work(self, task: ProjectTask, version: str) -> bool:
        """Tasks without a prediction of `version` (and, if asked, without annotations)."""
        return version not in task.prediction_versions and not (self.options.skip_annotated and task.is_labeled)

    def _label_config(self, label_config: str) -> Any:
        """The project's label config as this kind of run reads it (ConfigError when it cannot serve it)."""
        return parse_label_config(label_config)

    def _model_version(self) -> str:
        """The model version this run's predictions carry: a task holding one of it is skipped."""
        return self.predictor.decoders.current_name(self.project_id)

    def _work(self, batch: list[ProjectTask], config: Any) -> list[Any]:
        """One batch's outcomes (`config` as `_label_config` read it), one per task: an error (BackendError), what
        `_store` stores, or None for a task left undone (the run stopped in the middle of it: it stays handed over)."""
        urls = [task.data.get(config.image_field) for task in batch]
        return self._with_retries(lambda: self.predictor.predict_batch(urls, config, self.project_id))

    def _with_retries(self, call: Callable[[], list[Any]]) -> list[Any]:
        for _ in range(UNAVAILABLE_RETRIES):
            try:
                return call()
            except ModelNotReady as error:  # loading, or no queue worker alive / answering in time
                log.warning(
                    "project %d: %s; trying the batch again in %.0f s", self.project_id, error, UNAVAILABLE_PAUSE_S
                )
                time.sleep(UNAVAILABLE_PAUSE_S)
        return call()  # the last try: its error ends the run

    def _collect(self, in_flight: dict[Future, list[ProjectTask]], version: str) -> None:
        """Store the predictions of the batches that are done (at least one), record the errors."""
        done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
        for future in done:
            batch = in_flight.pop(future)
            # A batch the models could not take after every retry (failed to load, no worker answering) ends the run
            # visibly instead of writing an error for every task left; its tasks stay unpredicted for the next run.
            outcomes = future.result()
            errors = [(task, outcome) for task, outcome in zip(batch, outcomes, strict=True) if _failed(outcome)]
            answered = [(task, outcome) for task, outcome in zip(batch, outcomes, strict=True) if not _failed(outcome)]
            self.progress.predicted += self._store(answered)
            self._record_errors(errors, version)
            self._settled([task.id for task, outcome in zip(batch, outcomes, strict=True) if outcome is not None])
            self._left_undone += sum(outcome is None for outcome in outcomes)
            self.progress.busy_s = time.monotonic() - (self._work_started or time.monotonic())
            self.report(self.progress)

    def _store(self, answered: list[tuple[ProjectTask, Any]]) -> int:
        """Push the batch's predictions to Label Studio; how many it stored."""
        predictions = [{"task": task.id, **answer.entry} for task, answer in answered if isinstance(answer, TaskAnswer)]
        return self.api.push_predictions(self.project_id, predictions)

    def _record_errors(self, errors: list[tuple[ProjectTask, BackendError]], version: str) -> None:
        if not errors:
            return
        self.progress.failed += len(errors)
        self.errors_file().parent.mkdir(parents=True, exist_ok=True)
        with open(self.errors_file(), "a") as handle:
            for task, error in errors:
                status = error.status
                log.warning("project %d task %d: no prediction: %s", self.project_id, task.id, error)
                entry = {"time": time.time(), "task": task.id, "model_version": version, "status": status}
                handle.write(json.dumps({**entry, "error": str(error)}) + "\n")


def _failed(outcome: object) -> bool:
    return isinstance(outcome, BackendError)


class BackgroundRuns:
    """POST /preannotate's side: runs in a thread of the web process, progress and stop requests in the store,
    so any web worker can report on or stop a run another one started. Only the run that holds the project's
    claim (`ProjectRun.claim`) writes its progress or clears a stop: a start that finds the project claimed, by
    another thread, web worker or host, answers busy and leaves the running run's progress and stop alone."""

    def __init__(
        self, predictor: Inference, settings: Settings, store: ByteStore, run_class: type[ProjectRun] = ProjectRun
    ) -> None:
        self.predictor = predictor
        self.settings = settings
        self.store = store
        self.run_class = run_class

    def default_options(self) -> RunOptions:
        return self.run_class.default_options(self.settings, self.predictor)

    def progress(self, project_id: int) -> dict | None:
        data = self.store.get(self.run_class.PROGRESS_KEY.format(project=project_id))
        return json.loads(data) if data is not None else None

    def progress_by_project(self) -> dict[str, dict]:
        """The progress of every project's last run known to the store, by project id (for /status)."""
        known = {project_id: self.progress(project_id) for project_id in ProjectFiles.projects(self.settings.model_dir)}
        return {str(project_id): progress for project_id, progress in known.items() if progress is not None}

    def start(self, project_id: int, options: RunOptions, answer_within_s: float = 3.0) -> dict:
        """Start a run and wait briefly for its first state, so a busy project or a bad key answers at once."""
        api = ProjectApi(self.settings.label_studio_url, self.settings.label_studio_api_key)
        first_state = threading.Event()

        def report(progress: RunProgress) -> None:
            self._save(progress)
            first_state.set()

        stop_key = self.run_class.STOP_KEY.format(project=project_id)
        run = self.run_class(
            project_id,
            self.predictor,
            api,
            self.settings,
            options,
            report,
            lambda: self.store.get(stop_key) is not None,
        )
        claim = contextlib.ExitStack()
        try:
            claim.enter_context(run.claim())
        except LockBusy:
            return {**(self.progress(project_id) or {}), "state": "busy"}
        self.store.delete(stop_key)  # a stop asked of an earlier run, which ended before it saw it
        self._save(run.progress)  # "starting": a stop asked before the run's first report reaches it too
        threading.Thread(target=self._run, args=(run, claim), name=f"preannotate-{project_id}", daemon=True).start()
        first_state.wait(answer_within_s)
        return run.progress.as_dict()

    def _run(self, run: ProjectRun, claim: contextlib.ExitStack) -> None:
        with claim:  # taken by the request that started the run, let go when the run ends
            run.run_claimed()
        # Tasks handed over after the run's last look, while it still held the project (their start answered busy).
        waiting = run.handed_over()
        if run.progress.state == "finished" and waiting is not None and set(waiting.ids()) - run.attempted:
            self.start(run.project_id, replace(run.options, handed_over_only=True, max_tasks=None), answer_within_s=0)

    def hand_over(self, project_id: int, tasks: dict[int, dict]) -> dict:
        """Have the project's run predict these tasks (their data by id) and import their predictions: the run going
        on takes them after its own, else one starts that takes only them. Its progress (state busy when one was going
        on)."""
        waiting = self.run_class.waiting(ProjectFiles(self.settings.model_dir, project_id))
        if waiting is None:
            raise ValueError(f"a {self.run_class.KIND} run takes no tasks handed over")
        waiting.add(tasks)
        return self.start(project_id, replace(self.default_options(), handed_over_only=True), answer_within_s=0)

    def resume_handed_over(self) -> list[int]:
        """Start a run for every project whose handed-over tasks wait (the process stopped in the middle of one);
        the projects."""
        waiting = [
            project_id
            for project_id in ProjectFiles.projects(self.settings.model_dir)
            if (tasks := self.run_class.waiting(ProjectFiles(self.settings.model_dir, project_id))) and tasks.ids()
        ]
        for project_id in waiting:
            log.info("project %d: resuming the %s of the tasks handed over", project_id, self.run_class.KIND)
            self.hand_over(project_id, {})
        return waiting

    def stop(self, project_id: int) -> dict | None:
        """Ask the project's run to stop if one is going on; its progress, None if no run of it is known."""
        progress = self.progress(project_id)
        if progress is not None and progress["state"] in GOING_ON:
            self.store.set(self.run_class.STOP_KEY.format(project=project_id), b"1", PROGRESS_TTL_S)
        return progress

    def _save(self, progress: RunProgress) -> None:
        self.store.set(
            self.run_class.PROGRESS_KEY.format(project=progress.project),
            json.dumps(progress.as_dict()).encode(),
            PROGRESS_TTL_S,
        )
