"""Whole-project encoding: every task image of a Label Studio project gets its SAM embedding cached, for projects
whose tasks were imported before the backend was connected (those imported after are encoded on import).

The run is a `ProjectRun` (pages, batches, progress, stop, resume, one run per project on every host) whose batch
work is `Inference.encode_batch`: an image already cached is fetched and hashed but not encoded again, so a run that
stopped resumes by walking the project again at the cost of the downloads. `python -m backend encode --project ID`
runs it in the foreground; POST /encode?project=ID in the web tier's background.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend.project_files import ProjectFiles
from backend.protocol.label_config import ProjectConfig
from backend.protocol.project_api import ProjectTask
from backend.runs.preannotate import ProjectRun


class EncodeRun(ProjectRun):
    KIND = "encoding"
    ROUTE = "/encode"
    LOCK_KEY = "sam:encode-lock:{project}"
    PROGRESS_KEY = "sam:encode:{project}"
    STOP_KEY = "sam:encode:{project}:stop"

    def lock_file(self) -> Path:
        return self.files.encode_lock

    def errors_file(self) -> Path:
        return self.files.root / "encode-errors.jsonl"

    @classmethod
    def waiting(cls, files: ProjectFiles) -> None:
        return None  # /predict batches hand tasks to pre-annotation and tracking runs only

    def _needs_work(self, task: ProjectTask, version: str) -> bool:
        return not (self.options.skip_annotated and task.is_labeled)

    def _work(self, batch: list[ProjectTask], config: ProjectConfig) -> list[Any]:
        urls = [task.data.get(config.image_field) for task in batch]
        return self._with_retries(lambda: self.predictor.encode_batch(urls, self.project_id))

    def _store(self, answered: list[tuple[ProjectTask, Any]]) -> int:
        return len(answered)  # the embeddings are in the cache already
