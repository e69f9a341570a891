"""Label Studio's ML backend protocol over HTTP (Flask 3), wire-compatible with label-studio-ml 2.x: the
`routes` Blueprint, which `backend.http.server.create_app` registers.

Routes: GET /health (and /), POST /setup, POST /predict, POST /webhook, GET /versions, GET /status,
GET /metrics, POST|GET|DELETE /preannotate, /encode and /track (whole-project runs in the background), GET /evaluate (a
project's latest evaluation report), and GET /livez, the
only one open without credentials when auth is configured. Every bad input answers a 4xx JSON
`{"error": ...}` and a log line; the process keeps serving.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypedDict

from flask import Blueprint, Response, current_app, jsonify, request

from backend.bookkeeping.coverage import project_coverage
from backend.bookkeeping.imports import TASKS_CREATED, record_tasks_created
from backend.config import Settings
from backend.deadline import Deadline, TimeLimit
from backend.errors import (
    RETRY_AFTER_S,
    BackendError,
    BadRequest,
    ConfigError,
    DeadlineExceeded,
    ImageError,
    PromptError,
    VideoError,
    WebhookError,
)
from backend.http import metrics
from backend.inference.base import Inference, video_model_version
from backend.project_files import ProjectFiles
from backend.prompts.interactive import ContextPrompts
from backend.prompts.video import keyframe_objects
from backend.protocol.ids import is_label_studio_id
from backend.protocol.label_config import ProjectConfig, VideoConfig, parse_label_config, parse_video_config
from backend.protocol.results import TaskAnswer, region_rules, task_answer
from backend.protocol.video import video_prediction
from backend.runs.preannotate import GOING_ON, BackgroundRuns
from backend.runs.task_open import NotReady, TaskOpenPredictions

log = logging.getLogger(__name__)

MODEL_CLASS = "SamBackend"
REASON_PHRASE_CHARS = 400

routes = Blueprint("ml_backend", __name__)


@dataclass(frozen=True)
class Backend:
    """What the routes serve with, made once per app by `create_app`."""

    settings: Settings
    predictor: Inference
    model_calls: concurrent.futures.Executor  # the bounded pool a request's model calls run on, under its deadline
    runs: BackgroundRuns
    encode_runs: BackgroundRuns  # whole-project encoding (runs.encode.EncodeRun)
    track_runs: BackgroundRuns  # whole-project video tracking, and long tracks (runs.video.VideoTrackRun)
    task_opens: TaskOpenPredictions  # a task opened without a prediction: answered within TASK_OPEN_WAIT
    said: set[str] = field(default_factory=set)  # the advice already logged, which this process logs once


def current_backend() -> Backend:
    return current_app.extensions["backend"]


# What one task can fail with and still leave the others of its request answered.
TASK_ERRORS = (BadRequest, ImageError, PromptError, ConfigError, DeadlineExceeded, VideoError)


class TaskError(TypedDict):
    """A task /predict could not answer, as listed in its "errors"."""

    task: object  # the task's id, as Label Studio sent it
    index: int
    error: str
    status: int


def reason_phrase(message: str) -> str:
    """`message` fit for the HTTP status line: printable ASCII on one line, at most REASON_PHRASE_CHARS."""
    printable = "".join(char if " " <= char <= "~" else "?" for char in " ".join(message.split()))
    return printable[:REASON_PHRASE_CHARS]


def error_response(message: str, status: int, **details: object) -> Response:
    log.warning("%s %s -> %d: %s", request.method, request.path, status, message)
    response = jsonify({"error": message, "status": status, **details})
    # Label Studio shows a failed /health or /setup as requests' "<status> Client Error: <reason> for url: ..."
    # and never the body, so the reason phrase carries the message to the "Connect Model" dialog.
    response.status = f"{status} {reason_phrase(message)}"
    if status == 503:
        # Every 503 is temporary (models loading, no worker, a deadline): say when to come back.
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def json_body() -> object:
    """The request's JSON; a 400 saying what is wrong when it has none: the Content-Type header, or the JSON (too
    deeply nested counts as not JSON)."""
    if not request.is_json:
        sent = f"it was {request.mimetype[:80]!r}" if request.mimetype else "it had none"
        raise BadRequest(f"send the body as JSON with the header Content-Type: application/json ({sent})")
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        body = None
    if body is None:
        raise BadRequest("the body is not valid JSON")
    return body


def record_prediction_metrics(answer: TaskAnswer) -> None:
    if "embedding" not in answer.timings:
        return  # nothing was computed (an empty context)
    metrics.CACHE.labels("hit" if answer.cache_hit else "miss").inc()
    if not answer.cache_hit:
        metrics.ENCODE.observe(answer.timings.get("encode", 0.0))
    metrics.DECODE.observe(answer.timings.get("decode", 0.0))


def project_id_of(value: object) -> int | None:
    """Label Studio names the project "<id>.<created timestamp>" in /setup and /predict. Ids outside Label
    Studio's bigint range are no project (a 300-digit one would otherwise become a too-long path)."""
    if isinstance(value, str):
        head = value.split(".", 1)[0]
        value = int(head) if re.fullmatch(r"[0-9]{1,19}", head) else None
    return value if is_label_studio_id(value) else None


def usable_label_config(label_config: object) -> ProjectConfig:
    """The project's label config, or a 422 naming what the backend needs of it: an Image with a BrushLabels,
    PolygonLabels or RectangleLabels control to put its answers in."""
    if not isinstance(label_config, str):
        raise BadRequest("the label config must be the project's label config XML as a string", 422)
    config = parse_label_config(label_config)
    if not config.output_controls:
        raise ConfigError(
            f"the label config has no BrushLabels, PolygonLabels or RectangleLabels control for the Image "
            f"{config.image_name!r}; "
            f'add one, e.g. <BrushLabels name="tag" toName="{config.image_name}"><Label value="car"/></BrushLabels>'
        )
    return config


def _tasks_and_context(body: dict, settings: Settings) -> tuple[list[dict], str, object]:
    """The request's tasks, label config XML and context, each checked for shape."""
    tasks = body.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise BadRequest("'tasks' must be a non-empty list")
    if len(tasks) > settings.max_tasks_per_request:
        raise BadRequest(f"{len(tasks)} tasks in one request; at most {settings.max_tasks_per_request}", 413)
    if not all(isinstance(task, dict) and isinstance(task.get("data"), dict) for task in tasks):
        raise BadRequest("every task must be an object with a 'data' object")
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise BadRequest("'params' must be an object")
    label_config = body.get("label_config") or ""
    if not isinstance(label_config, str):
        raise BadRequest("'label_config' must be the project's label config XML as a string", 422)
    return tasks, label_config, params.get("context")


def video_project(label_config: object) -> VideoConfig | None:
    """The label config's <Video> project, None for an image project; 422 naming what a video config lacks."""
    if not isinstance(label_config, str) or not label_config.strip():
        return None
    try:
        return parse_video_config(label_config)
    except ConfigError as error:
        raise BadRequest(str(error), 422) from error


def _parse_predict_body(tasks: list[dict], label_config: str) -> ProjectConfig:
    try:
        config = parse_label_config(label_config)
    except ConfigError as error:
        raise BadRequest(str(error), 422) from error
    if not config.output_controls:
        raise BadRequest(
            "the label config has no BrushLabels, PolygonLabels or RectangleLabels control for the image; add one "
            "to receive answers",
            422,
        )
    return config


@routes.get("/livez")
def livez() -> Response:
    # Liveness only: open to probes without credentials, so it tells nothing about the models.
    return jsonify({"status": "alive"})


@routes.get("/")
@routes.get("/health")
def health() -> Response:
    # Label Studio gives /health 1 s: report the loading state, never wait for it. A load that failed is not UP,
    # so that "Connect Model" fails showing why (while loading, a prediction's 503 says to retry).
    backend = current_backend()
    backend.predictor.warm_up()
    state = backend.predictor.status()
    if state.get("models") == "failed":
        message = f"SAM could not be loaded, fix the setting and restart the backend: {state['model_error']}"
        return error_response(message, 500, model_class=MODEL_CLASS, **state)
    return jsonify({"status": "UP", "model_class": MODEL_CLASS, **state})


@routes.post("/setup")
def setup() -> Response:
    # Label Studio gives /setup 3 s: start loading, never wait for it here.
    backend = current_backend()
    backend.predictor.warm_up()
    body = json_body()
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    schema = body.get("schema")
    if schema is not None and video_project(schema) is not None:
        return jsonify({"model_version": video_model_version(backend.settings)})
    if schema is not None:
        # The project's label config, checked when the model is connected rather than at the first task.
        usable_label_config(schema)
    return jsonify({"model_version": backend.predictor.decoders.current_name(project_id_of(body.get("project")))})


def _predict_interactive(
    task: dict, config: ProjectConfig, prompts: ContextPrompts, project_id: int | None, deadline: Deadline
) -> TaskAnswer | BackendError:
    backend = current_backend()
    try:
        image_url = task["data"].get(config.image_field)
        if image_url is None:
            raise BadRequest(f"task has no data.{config.image_field}")
        prediction = deadline.run(
            backend.predictor.predict_interactive, image_url, task.get("id"), prompts, project_id, config
        )
        rules = replace(region_rules(backend.settings, config), max_answer_bytes=None)
        return task_answer(prediction, config, backend.settings.base_model_version, rules)
    except TASK_ERRORS as error:
        return error


@routes.post("/predict")
def predict() -> tuple[Response, int] | Response:
    backend = current_backend()
    body = json_body()
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with 'tasks' and 'label_config'")
    tasks, label_config, context = _tasks_and_context(body, backend.settings)
    project_id = project_id_of(body.get("project"))
    if (video := video_project(label_config)) is not None:
        return _predict_video(tasks, video, context, project_id)
    config = _parse_predict_body(tasks, label_config)
    deadline = Deadline(backend.model_calls, backend.settings.predict_deadline_s)
    outcomes: list[TaskAnswer | BackendError | NotReady]
    background: dict | None = None
    if context is None:
        # "Retrieve predictions" or a task opened without one: pre-annotate the tasks chunk by chunk; those
        # not done by the deadline are answered [] (see below) and handed to the project's background run.
        image_urls = [task["data"].get(config.image_field) for task in tasks]
        try:
            if len(tasks) == 1:
                # A task just opened (or a one-task batch): the annotator waits, so TASK_OPEN_WAIT at most.
                outcomes = [backend.task_opens.predict(image_urls[0], config, project_id, tasks[0].get("id"))]
            else:
                outcomes = list(deadline.run_in_steps(backend.predictor.predict_batch, image_urls, config, project_id))
        except PromptError as error:
            raise BadRequest(str(error), error.status) from error
        except (DeadlineExceeded, ImageError, ConfigError) as error:
            outcomes = [error] * len(tasks)
        background = _hand_over_unfinished(backend, project_id, tasks, outcomes)
    else:
        try:
            prompts = backend.predictor.read_context(context, config)
        except (PromptError, ConfigError) as error:
            # One context serves every task of the request: a bad one is refused whole, before any download.
            raise BadRequest(str(error), error.status) from error
        outcomes = [_predict_interactive(task, config, prompts, project_id, deadline) for task in tasks]
    results: list[dict | list] = []  # an empty list for a task not answered
    errors: list[TaskError] = []
    last_answer: TaskAnswer | None = None
    for index, (task, outcome) in enumerate(zip(tasks, outcomes, strict=True)):
        if isinstance(outcome, NotReady):
            results.append([])  # computed in the background: the task opens now, the next open gets it
            continue
        if isinstance(outcome, TaskAnswer):
            results.append(outcome.entry)
            record_prediction_metrics(outcome)
            last_answer = outcome
            continue
        errors.append(_task_error(task, index, outcome))
        # An empty list makes Label Studio store no prediction for the task (a dict with an empty
        # result would be stored), so the next "Retrieve predictions" asks for it again.
        results.append([])
    if project_id is not None and len(tasks) == 1 and is_label_studio_id(tasks[0].get("id")):
        # The annotator is on this task: encode the next ones now, after this answer's own work. Bookkeeping must
        # never cost the answer, which is ready: whatever goes wrong here is logged and the answer goes out.
        try:
            backend.predictor.prefetch(project_id, tasks[0]["id"])
        except Exception:
            log.exception("project %d: the tasks after task %s were not prefetched", project_id, tasks[0]["id"])
    if errors and len(errors) == len(tasks):
        # Nothing to show: answer the first error's status so the caller sees why.
        message = errors[0]["error"]
        if all(isinstance(outcome, DeadlineExceeded) for outcome in outcomes):
            message = _none_in_time(backend.settings, len(tasks), background)
        return error_response(message, errors[0]["status"], errors=errors, **_background_field(background))
    response = jsonify({"results": results, **({"errors": errors} if errors else {}), **_background_field(background)})
    if last_answer is not None and len(tasks) == 1:
        response.headers["X-Embedding-Cache"] = "hit" if last_answer.cache_hit else "miss"
        response.headers["Server-Timing"] = ", ".join(
            f"{name};dur={seconds * 1000:.1f}" for name, seconds in last_answer.timings.items()
        )
    return response


def _task_error(task: dict, index: int, error: BackendError) -> TaskError:
    """A task the request could not answer, logged and counted, as its "errors" entry lists it."""
    log.warning("task %s (#%d): %s", task.get("id"), index, error)
    metrics.PREDICT_ERRORS.labels(str(error.status)).inc()
    return {"task": task.get("id"), "index": index, "error": str(error), "status": error.status}


def _predict_video(
    tasks: list[dict], config: VideoConfig, context: object, project_id: int | None
) -> tuple[Response, int] | Response:
    """Each <Video> task's regions tracked from their keyframes (the context's, else the task's latest saved ones).
    A saved task's track that PREDICT_DEADLINE cuts short goes on in the project's tracking run (`runs.video`)."""
    backend = current_backend()
    settings = backend.settings
    limit = TimeLimit(settings.predict_deadline_s)
    version = video_model_version(settings)
    results: list[dict | list] = []
    errors: list[TaskError] = []
    unfinished: dict[int, dict] = {}
    for index, task in enumerate(tasks):
        try:
            objects = keyframe_objects(task, context, config, settings.max_video_objects)
            tracks = backend.predictor.track_video(task["data"].get(config.video_field), objects, config, limit)
        except TASK_ERRORS as error:
            if isinstance(error, DeadlineExceeded) and context is None and is_label_studio_id(task.get("id")):
                unfinished[task["id"]] = {key: task.get(key) for key in ("id", "data", "annotations", "drafts")}
            errors.append(_task_error(task, index, error))
            results.append([])
            continue
        results.append(video_prediction(tracks, version))
    background = _hand_over(backend, backend.track_runs, project_id, unfinished)
    if errors and len(errors) == len(tasks):
        message = errors[0]["error"]
        if background is not None and len(unfinished) == len(tasks):
            message = (
                f"tracking did not finish within PREDICT_DEADLINE ({settings.predict_deadline_s:g} s); it goes on in "
                f"the background and the track is imported into Label Studio when done (progress: GET "
                f"{background['progress']})"
            )
        return error_response(message, errors[0]["status"], errors=errors, **_background_field(background))
    return jsonify({"results": results, **({"errors": errors} if errors else {}), **_background_field(background)})


def _hand_over_unfinished(backend: Backend, project_id: int | None, tasks: list[dict], outcomes: list) -> dict | None:
    """The image tasks of a batch that the deadline left unfinished, handed to the project's pre-annotation run (a
    one-task request is a task opened, which `runs.task_open` finishes instead)."""
    if len(tasks) == 1:
        return None
    unfinished = {
        task["id"]: task["data"]
        for task, outcome in zip(tasks, outcomes, strict=True)
        if isinstance(outcome, DeadlineExceeded) and is_label_studio_id(task.get("id"))
    }
    return _hand_over(backend, backend.runs, project_id, unfinished)


def _hand_over(
    backend: Backend, runs: BackgroundRuns, project_id: int | None, unfinished: dict[int, dict]
) -> dict | None:
    """Hand tasks the deadline left unfinished to the project's background run of `runs`, which imports their
    predictions into Label Studio as it makes them; what was handed over, for the answer. Without Label Studio's API
    (LABEL_STUDIO_URL and a key) the tasks stay unfinished, as the log says once."""
    if not unfinished or project_id is None:
        return None
    if not backend.settings.label_studio_url or not backend.settings.label_studio_api_key:
        if "no background runs" not in backend.said:
            backend.said.add("no background runs")
            log.warning(
                "%d tasks were not answered within PREDICT_DEADLINE and are answered []: set LABEL_STUDIO_URL "
                "and LABEL_STUDIO_API_KEY to have such tasks finished in the background and imported into Label "
                "Studio (logged once)",
                len(unfinished),
            )
        return None
    progress = runs.hand_over(project_id, unfinished)
    log.info(
        "project %d: %d tasks not finished within PREDICT_DEADLINE go on in the background %s run (%s); their "
        "predictions are imported into Label Studio as they are made",
        project_id,
        len(unfinished),
        runs.run_class.KIND,
        "joining the run going on" if progress.get("state") == "busy" else "a run started",
    )
    return {
        "project": project_id,
        "tasks": list(unfinished),
        "progress": f"{runs.run_class.ROUTE}?project={project_id}",
    }


def _background_field(background: dict | None) -> dict:
    return {"background": background} if background is not None else {}


def _none_in_time(settings: Settings, tasks: int, background: dict | None) -> str:
    """Why a batch answered no task at all, and what to change."""
    seconds = settings.predict_deadline_s
    said = (
        f"not one of the {tasks} tasks could be pre-annotated within PREDICT_DEADLINE ({seconds:g}"
        " s), not even one image on its own: raise PREDICT_DEADLINE (and Label Studio's ML_TIMEOUT_PREDICT above it)"
        " or run the models on a GPU; "
    )
    if background is not None:
        return said + (
            "the tasks go on in the background and their predictions are imported into Label Studio as they are made"
            f" (progress: GET {background['progress']})"
        )
    return said + "with LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set they would go on in the background"


@routes.get("/status")
def status() -> Response:
    backend = current_backend()
    served = backend.predictor.decoders.current_name(None)  # in queue mode, the workers' model_version
    encoded = project_coverage(backend.settings.model_dir, backend.predictor.cache_store())
    return jsonify(
        {
            "model_class": MODEL_CLASS,
            "model_version": served,
            **backend.predictor.status(),
            "encoded_images": encoded,
            "set_aside_events": backend.predictor.learning.set_aside_counts(),
            "preannotation": backend.runs.progress_by_project(),
        }
    )


@routes.get("/metrics")
def metrics_text() -> Response:
    backend = current_backend()
    return Response(metrics.render(backend.predictor.status()), content_type=metrics.CONTENT_TYPE)


@routes.post("/webhook")
def webhook() -> tuple[Response, int] | Response:
    backend = current_backend()
    body = json_body()
    if not isinstance(body, dict) or not isinstance(body.get("action"), str):
        raise BadRequest("a webhook body is a JSON object with an 'action'")
    try:
        if body["action"] == TASKS_CREATED:
            # Recorded within the webhook's second; the images are encoded later, below clicks and pre-annotation.
            project_id = record_tasks_created(body, backend.settings.model_dir)
            if backend.settings.encode_on_import:
                backend.predictor.encode_imports(project_id)
            # Without ENCODE_ON_IMPORT the list waits for the requests that prefetch from it, and for /encode.
            status = "queued" if backend.settings.encode_on_import else "recorded"
            answer = {"status": status, "action": TASKS_CREATED, "project": project_id}
        else:
            answer = backend.predictor.learning.receive(body)
    except WebhookError as error:
        raise BadRequest(str(error)) from error
    log.info("webhook %s for project %s: %s", body["action"], answer.get("project"), answer["status"])
    return jsonify(answer)


@routes.post("/preannotate")
def preannotate_start() -> tuple[Response, int] | Response:
    backend = current_backend()
    body = json_body()
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with 'project'")
    project_id = project_id_of(body.get("project"))
    if project_id is None:
        raise BadRequest(f"'project' must be a Label Studio project id, got {body.get('project')!r}")
    _check_project_api(backend.settings, "whole-project pre-annotation")
    options = backend.runs.default_options()
    for name in ("max_tasks", "batch_size"):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise BadRequest(f"'{name}' must be a positive integer, got {value!r}")
            setattr(options, name, value)
    options.skip_annotated = bool(body.get("skip_annotated", False))
    return _started(backend.runs, backend.runs.start(project_id, options))


def _check_project_api(settings: Settings, what: str) -> None:
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise BadRequest(f"{what} needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY", 422)


def _started(runs: BackgroundRuns, progress: dict) -> tuple[Response, int] | Response:
    """The answer to a project run's start: 202 with its first progress, 409 if one runs, 422 if it failed."""
    if progress["state"] == "busy":
        return error_response(f"another {runs.run_class.KIND} run of this project is going on", 409, progress=progress)
    if progress["state"] == "failed":
        return error_response(progress["message"], 422, progress=progress)
    return jsonify(progress), 202


def requested_project() -> int:
    project_id = project_id_of(request.args.get("project", ""))
    if project_id is None:
        raise BadRequest(f"?project= must be a Label Studio project id, got {request.args.get('project')!r}")
    return project_id


def _unknown_run(runs: BackgroundRuns, project_id: int) -> BadRequest:
    return BadRequest(f"no {runs.run_class.KIND} run of project {project_id} is known", 404)


def _progress(runs: BackgroundRuns) -> Response:
    project_id = requested_project()
    progress = runs.progress(project_id)
    if progress is None:
        raise _unknown_run(runs, project_id)
    return jsonify(progress)


def _stop(runs: BackgroundRuns) -> tuple[Response, int]:
    """202 "stopping" for a run going on; 200 with the progress of one that has ended; 404 if none is known."""
    project_id = requested_project()
    progress = runs.stop(project_id)
    if progress is None:
        raise _unknown_run(runs, project_id)
    if progress["state"] not in GOING_ON:
        return jsonify(progress), 200
    return jsonify({"project": project_id, "state": "stopping"}), 202


@routes.get("/preannotate")
def preannotate_progress() -> Response:
    return _progress(current_backend().runs)


@routes.delete("/preannotate")
def preannotate_stop() -> tuple[Response, int]:
    return _stop(current_backend().runs)


def _project_run_routes(route: str, runs_of: Callable[[Backend], BackgroundRuns], doc: str) -> None:
    """POST `route`?project= starts the project's run of `runs_of`, GET reports its progress, DELETE stops it."""

    def start() -> tuple[Response, int] | Response:
        backend = current_backend()
        project_id = requested_project()
        runs = runs_of(backend)
        _check_project_api(backend.settings, f"whole-project {runs.run_class.KIND}")
        return _started(runs, runs.start(project_id, runs.default_options()))

    start.__doc__ = doc
    name = route.strip("/")
    routes.add_url_rule(route, f"{name}_start", start, methods=["POST"])
    routes.add_url_rule(route, f"{name}_progress", lambda: _progress(runs_of(current_backend())), methods=["GET"])
    routes.add_url_rule(route, f"{name}_stop", lambda: _stop(runs_of(current_backend())), methods=["DELETE"])


_project_run_routes(
    "/encode",
    lambda backend: backend.encode_runs,
    "Encode every task image of ?project= in the background (tasks imported before the backend was connected).",
)
_project_run_routes(
    "/track",
    lambda backend: backend.track_runs,
    "Track every video task of ?project= with keyframes drawn and no track yet, in the background; each track is "
    "imported into Label Studio as it is made.",
)


@routes.get("/versions")
def versions() -> Response:
    backend = current_backend()
    raw = request.args.get("project")
    if raw is None:
        return jsonify(backend.predictor.learning.describe_all())
    project_id = project_id_of(raw)
    if project_id is None:
        raise BadRequest(f"project must be a Label Studio project id, got {raw!r}")
    return jsonify(backend.predictor.learning.describe(project_id))


@routes.get("/evaluate")
def evaluation() -> Response:
    """The newest evaluation report of ?project=, as `python -m backend evaluate` wrote it under MODEL_DIR (on the
    machine that has the models; the web tier only reads it)."""
    backend = current_backend()
    project_id = requested_project()
    report = ProjectFiles(backend.settings.model_dir, project_id).latest_evaluation()
    if report is None:
        raise BadRequest(
            f"project {project_id} has no evaluation report yet: run `python -m backend evaluate --project "
            f"{project_id}` where the models are (in queue mode, on a worker's machine sharing MODEL_DIR)",
            404,
        )
    return jsonify({**json.loads(report.read_bytes()), "report": report.name})
