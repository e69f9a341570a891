"""The Flask app factory: one app per process, with authentication, timing and error handling around the
routes of `backend.http.routes`. `create_app` is the HTTP layer's only entry; the composition root calls it."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.config import Settings
from backend.errors import BackendError
from backend.http import metrics
from backend.http.access import AccessControl
from backend.http.routes import Backend, error_response, routes
from backend.inference.base import Inference
from backend.protocol.project_api import ProjectApi
from backend.runs.encode import EncodeRun
from backend.runs.preannotate import BackgroundRuns
from backend.runs.task_open import TaskOpenPredictions
from backend.runs.video import VideoTrackRun

log = logging.getLogger(__name__)


def label_studio_api(settings: Settings) -> ProjectApi | None:
    """Label Studio's REST API when LABEL_STUDIO_URL and a key are set, else None."""
    if settings.label_studio_url and settings.label_studio_api_key:
        return ProjectApi(settings.label_studio_url, settings.label_studio_api_key)
    return None


def create_app(settings: Settings, predictor: Inference) -> Flask:
    """The app serving Label Studio's ML backend protocol with `predictor`'s models."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["backend"] = Backend(
        settings=settings,
        predictor=predictor,
        model_calls=concurrent.futures.ThreadPoolExecutor(settings.predict_threads, thread_name_prefix="predict"),
        runs=BackgroundRuns(predictor, settings, predictor.store),
        encode_runs=BackgroundRuns(predictor, settings, predictor.store, EncodeRun),
        track_runs=BackgroundRuns(predictor, settings, predictor.store, VideoTrackRun),
        task_opens=TaskOpenPredictions(predictor, settings.task_open_wait_s, label_studio_api(settings)),
    )
    if settings.label_studio_url and settings.label_studio_api_key:
        # A restart in the middle of a hand-over goes on.
        app.extensions["backend"].runs.resume_handed_over()
        app.extensions["backend"].track_runs.resume_handed_over()
    access = AccessControl(settings.basic_auth_user, settings.basic_auth_pass, settings.bearer_token)

    @app.before_request
    def authenticate() -> Response | None:
        g.started = time.perf_counter()
        if request.path == "/livez" or access.allows(request.headers.get("Authorization", "")):
            return None
        response = error_response("authentication required", 401)
        response.headers["WWW-Authenticate"] = access.challenge()
        return response

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(error: RequestEntityTooLarge) -> Response:
        return error_response(
            f"the request body is larger than MAX_REQUEST_BYTES ({settings.max_request_bytes} bytes)", 413
        )

    app.after_request(_stamp)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(BackendError, _backend_error)
    app.register_error_handler(Exception, _unexpected)
    app.register_blueprint(routes)
    return app


def _stamp(response: Response) -> Response:
    """Metrics by route, and the worker pid and time spent in headers."""
    route = request.url_rule.rule if request.url_rule else "unmatched"
    elapsed = time.perf_counter() - g.get("started", time.perf_counter())
    metrics.REQUESTS.labels(route, str(response.status_code)).inc()
    metrics.LATENCY.labels(route).observe(elapsed)
    response.headers["X-Worker-Pid"] = str(os.getpid())
    parts = [response.headers.get("Server-Timing"), f"total;dur={elapsed * 1000:.1f}"]
    response.headers["Server-Timing"] = ", ".join(part for part in parts if part)
    return response


def _http_error(error: HTTPException) -> Response:
    return error_response(error.description or error.name, error.code or 500)


def _backend_error(error: BackendError) -> Response:
    return error_response(str(error), error.status)


def _unexpected(error: Exception) -> tuple[Response, int]:
    log.exception("unexpected error on %s %s", request.method, request.path)
    return jsonify({"error": f"internal error: {type(error).__name__}", "status": 500}), 500
