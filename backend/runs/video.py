"""Whole-project video tracking: every <Video> task of a Label Studio project is tracked through its video from the
keyframe boxes of its saved annotation or draft (or pre-annotated from the project's labels when it has none), and
the tracks are imported as the task's prediction.

A track of a long video takes longer than Label Studio waits for /predict on a CPU (a few frames a second at best),
so this is where long videos go: `POST /track?project=ID` starts a run in the web tier's background, `GET` reports
its progress down to the frames reached in the video being tracked, and `DELETE` stops it within a frame step; a
"Retrieve predictions" that runs out of PREDICT_DEADLINE on a video hands the task over to it
(MODEL_DIR/<project>/handed-over-videos.json). `python -m backend track --project ID` runs it in the foreground.

It is a `ProjectRun` (pages, claim, progress, stop, resume, errors in MODEL_DIR/<project>/track-errors.jsonl), one
task a batch: a task already holding a prediction of the video model version is skipped. A task with nothing drawn is
pre-annotated from the video's labels (zero-click, `inference.video`), or skipped in a project without labels. A task
stopped in the middle is left unpredicted (and handed over, if it was), so the next run tracks it again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from backend.config import Settings
from backend.deadline import NO_LIMIT
from backend.errors import BackendError, ConfigError, ModelNotReady
from backend.inference.base import Inference, video_model_version
from backend.project_files import ProjectFiles
from backend.prompts.video import drawn_objects, keyframe_objects
from backend.protocol.label_config import VideoConfig, parse_video_config
from backend.protocol.project_api import ProjectTask
from backend.protocol.results import TaskAnswer
from backend.protocol.video import video_prediction
from backend.runs.handed_over import HandedOverTasks
from backend.runs.preannotate import ProjectRun, RunOptions

REPORT_EVERY_S = 1.0  # the progress of a track is saved at most this often


class TrackStopped(Exception):
    """A stop was asked for while a video was being tracked: its task is left for the next run."""


class VideoTrackRun(ProjectRun):
    KIND = "video tracking"
    ROUTE = "/track"
    LOCK_KEY = "sam:track-lock:{project}"
    PROGRESS_KEY = "sam:track:{project}"
    STOP_KEY = "sam:track:{project}:stop"

    config: VideoConfig

    @classmethod
    def default_options(cls, settings: Settings, predictor: Inference) -> RunOptions:
        return RunOptions(batch_size=1, parallel=1)  # one video at a time: a track holds the tracker to itself

    @classmethod
    def waiting(cls, files: ProjectFiles) -> HandedOverTasks:
        return HandedOverTasks(files.handed_over_videos)

    def lock_file(self) -> Path:
        return self.files.track_lock

    def errors_file(self) -> Path:
        return self.files.track_errors

    def _label_config(self, label_config: str) -> VideoConfig:
        config = parse_video_config(label_config)
        if config is None:
            raise ConfigError(
                f"project {self.project_id}'s label config has no <Video> with a <VideoRectangle>: a tracking run "
                "tracks video tasks; pre-annotate image projects with /preannotate"
            )
        self.config = config  # `_needs_work` reads the task's regions through it
        return config

    def _model_version(self) -> str:
        return video_model_version(self.settings)

    def _waiting_task(self, task_id: int, handed_over: dict, prediction_versions: tuple[str, ...]) -> ProjectTask:
        """A handed-over video task is kept as Label Studio sent it, keyframes and all."""
        return ProjectTask(
            task_id,
            handed_over.get("data") or {},
            prediction_versions,
            is_labeled=False,
            annotations=tuple(handed_over.get("annotations") or ()),
            drafts=tuple(handed_over.get("drafts") or ()),
        )

    def _needs_work(self, task: ProjectTask, version: str) -> bool:
        """Tasks without a prediction of `version` with boxes drawn, or with none in a project whose video has
        labels (pre-annotated from them); with neither, a task has nothing to track yet."""
        if not super()._needs_work(task, version):
            return False
        if self.config.labels:
            return True
        try:
            return bool(drawn_objects(task.as_sent(), self.config))
        except BackendError:
            return True  # a malformed region: tracking it records the error that says what to fix

    def _work(self, batch: list[ProjectTask], config: VideoConfig) -> list[Any]:
        return [self._track(task, config) for task in batch]

    def _track(self, task: ProjectTask, config: VideoConfig) -> TaskAnswer | BackendError | None:
        """The task's prediction, its error, or None when a stop came in the middle of its track."""
        self.progress.task, self.progress.frames_done, self.progress.frames_total = task.id, 0, 0
        self.report(self.progress)
        reported = time.monotonic()

        def on_step(done: int, total: int) -> None:
            nonlocal reported
            if self.should_stop():
                raise TrackStopped
            self.progress.frames_done, self.progress.frames_total = done, total
            if time.monotonic() - reported >= REPORT_EVERY_S:
                reported = time.monotonic()
                self.report(self.progress)

        try:
            objects = keyframe_objects(task.as_sent(), None, config, self.settings.max_video_objects)
            url = task.data.get(config.video_field)
            tracks = self._with_retries(lambda: [self.predictor.track_video(url, objects, config, NO_LIMIT, on_step)])[
                0
            ]
        except TrackStopped:
            return None
        except ModelNotReady:
            raise  # no model after every retry: the run ends, the task stays for the next one
        except BackendError as error:
            return error
        return TaskAnswer(video_prediction(tracks, self._model_version()))
