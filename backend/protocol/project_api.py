"""Label Studio's REST API for whole-project runs, through label-studio-sdk: a project's label config,
its tasks page by page, and predictions pushed back in bulk.

The SDK takes either kind of key (a legacy token or a personal access token, which it exchanges for
short-lived access tokens itself), so LABEL_STUDIO_API_KEY works here as it does for image downloads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import httpx
from label_studio_sdk import LabelStudio, PredictionRequest
from label_studio_sdk.core.api_error import ApiError

from backend.errors import LabelStudioUnavailable, ProjectApiError
from backend.protocol.auth import label_studio_client, sdk_authorization

# A project run can be long; one slow Label Studio answer should not end it.
HTTP_TIMEOUT_S = 120.0
SAID_CHARS = 200  # of Label Studio's answer to a failed call, quoted in the error


@dataclass(frozen=True)
class ProjectTask:
    id: int
    data: dict
    prediction_versions: tuple[str, ...]  # model_version of each prediction the task already holds
    is_labeled: bool
    # As the task listing has them: a video tracking run reads the keyframes drawn in them.
    annotations: tuple[dict, ...] = ()
    drafts: tuple[dict, ...] = ()

    def as_sent(self) -> dict:
        """The task as Label Studio sends it to /predict: id, data, annotations and drafts."""
        return {"id": self.id, "data": self.data, "annotations": list(self.annotations), "drafts": list(self.drafts)}


@dataclass(frozen=True)
class ProjectInfo:
    id: int
    title: str
    label_config: str
    task_count: int


class ProjectApi:
    def __init__(self, url: str, api_key: str) -> None:
        if not url or not api_key:
            raise ProjectApiError("a project run needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        self.url = url
        self.api_key = api_key
        self._client: LabelStudio | None = None

    @property
    def client(self) -> LabelStudio:
        """label-studio-sdk's client, made on first use: the SDK refuses an expired key when the client is made,
        and that refusal belongs to the call that needs Label Studio (a 4xx naming the key), not to start-up."""
        if self._client is None:
            self._client = label_studio_client(self.url, self.api_key, timeout=HTTP_TIMEOUT_S)
        return self._client

    def _call(self, what: str, method: str, **kwargs):
        """The SDK client's `method` (a dotted path such as "projects.get"), its ApiError turned into ours. A 401
        to a personal access token's access token is asked once more with a fresh exchange: the SDK renews that
        token only by its own clock, and one that expires while a request waits in a busy Label Studio (a long
        run's import, say) is refused though the key is good."""
        try:
            try:
                return attrgetter(method)(self.client)(**kwargs)
            except ApiError as error:
                if error.status_code != 401 or not sdk_authorization(self.client).startswith("Bearer "):
                    raise
                self._client = None
                return attrgetter(method)(self.client)(**kwargs)
        except ApiError as error:
            status = error.status_code or 0
            message = f"Label Studio at {self.url}: {what} answered HTTP {status}{_said(error.body)}{_advice(status)}"
            transient = status >= 500 or status in (0, 408, 429)
            raise (LabelStudioUnavailable if transient else ProjectApiError)(message) from error
        except (httpx.HTTPError, OSError) as error:  # connection refused, DNS, time-outs: the SDK speaks httpx
            raise LabelStudioUnavailable(f"Label Studio at {self.url}: {what} failed: {error}") from error

    def project(self, project_id: int) -> ProjectInfo:
        project = self._call(f"project {project_id}", "projects.get", id=project_id)
        return ProjectInfo(
            id=project_id,
            title=project.title or "",
            label_config=project.label_config or "",
            task_count=int(project.task_number or 0),
        )

    def tasks(self, project_id: int, page_size: int) -> Iterator[ProjectTask]:
        """Every task of the project, in id order, one page in memory at a time."""
        page, seen = 1, 0
        while True:
            listing = self._call(
                f"tasks of project {project_id}, page {page}",
                "tasks.list",
                project=project_id,
                page=page,
                page_size=page_size,
                fields="all",
            )
            tasks = listing.items or []
            for task in tasks:
                yield _project_task(task)
            seen += len(tasks)
            total = listing.response.total if listing.response is not None else seen
            if not tasks or seen >= total:
                return
            page += 1

    def prediction_versions(self, task_id: int) -> tuple[str, ...]:
        """The model_version of each prediction the task holds now. (Not through the task's own API: Label Studio
        answers that by asking the ML backend for the prediction of a task without one, when the project retrieves
        predictions automatically.)"""
        predictions = self._call(f"predictions of task {task_id}", "predictions.list", task=task_id)
        return tuple(_model_version(prediction) for prediction in predictions or [])

    def push_predictions(self, project_id: int, predictions: list[dict]) -> int:
        """Store predictions (dicts with task, result, score, model_version) in one call; how many were stored."""
        if not predictions:
            return 0
        requests = [PredictionRequest(**prediction) for prediction in predictions]
        answer = self._call(
            f"import of {len(requests)} predictions into project {project_id}",
            "projects.import_predictions",
            id=project_id,
            request=requests,
        )
        return int(getattr(answer, "created", len(requests)) or 0)


def _project_task(task: Any) -> ProjectTask:  # one of the SDK's listed tasks
    return ProjectTask(
        id=int(task.id),
        data=dict(task.data or {}),
        prediction_versions=tuple(_model_version(prediction) for prediction in task.predictions or []),
        is_labeled=bool(getattr(task, "is_labeled", False)),
        annotations=tuple(_as_dict(annotation) for annotation in getattr(task, "annotations", None) or []),
        drafts=tuple(_as_dict(draft) for draft in getattr(task, "drafts", None) or []),
    )


def _as_dict(item: Any) -> dict:
    """An annotation or draft of the SDK's listing (a dict, or one of its pydantic models) as plain JSON."""
    return item if isinstance(item, dict) else item.model_dump(mode="json")


def _said(body: object) -> str:
    """What Label Studio said, in a few words: its JSON `detail`, or the start of a text answer; never a page."""
    text = str((body.get("detail") or body.get("error") or body) if isinstance(body, dict) else body or "")
    if re.search(r"<(!doctype|html|head|body)\b", text, re.IGNORECASE):
        return " (an HTML page, not Label Studio's API)"
    text = " ".join(text.split())
    return f": {text[:SAID_CHARS]}" if text else ""


def _advice(status: int) -> str:
    if status in (401, 403):
        return "; check LABEL_STUDIO_API_KEY"
    if status == 404:
        return "; check LABEL_STUDIO_URL (Label Studio's address) and the project id"
    return ""


def _model_version(prediction: object) -> str:
    value = (
        prediction.get("model_version") if isinstance(prediction, dict) else getattr(prediction, "model_version", "")
    )
    return str(value or "")
