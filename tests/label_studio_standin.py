"""A real HTTP server that serves task images the way Label Studio 1.23 does, for tests.

It answers only what an ML backend asks Label Studio for (recorded in tests/fixtures/ls-protocol):
`/data/upload/...` and `/data/local-files/?d=...` need `Authorization: Token <legacy>` (when legacy
tokens are enabled) or `Bearer <access>`, where the access token comes from
`POST /api/token/refresh/ {"refresh": <personal access token>}` and expires. Everything else is a
plain file server for "other hosts". Projects added with `add_project` are served through the REST
calls a whole-project run makes (the project, its tasks page by page, a task's predictions, a bulk
import of predictions), with the same credentials. Faults for tests: `stalls` (path, or path with its query -> seconds
to wait before answering), `redirects` (path -> Location), and `?chunked=1` streams a file without Content-Length.
The real Label Studio is exercised by tests/e2e.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import jwt
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

SECRET = "test-signing-key-for-the-label-studio-stand-in"


def make_personal_access_token(user_id: int = 1, lifetime_s: int = 3600 * 24, secret: str = SECRET) -> str:
    now = int(time.time())
    claims = {"token_type": "refresh", "user_id": user_id, "iat": now, "exp": now + lifetime_s, "jti": "pat"}
    return jwt.encode(claims, secret, algorithm="HS256")


class LabelStudioStandIn:
    def __init__(
        self,
        media_root: Path,
        legacy_token: str = "legacy-token-0123456789",
        legacy_enabled: bool = True,
        host: str = "127.0.0.1",
    ):
        self.media_root = media_root
        self.legacy_token = legacy_token
        self.legacy_enabled = legacy_enabled
        self.access_lifetime_s = 300
        self.requests: list[tuple[str, str, str]] = []  # (method, path, auth scheme)
        self.refreshes = 0
        self.access_generation = 0  # access tokens of an older generation are refused
        self.delay_s = 0.0
        self.stalls: dict[str, float] = {}
        self.redirects: dict[str, str] = {}
        self.projects: dict[int, dict] = {}
        self.imported: dict[int, list[dict]] = {}  # project id -> every prediction imported, in order
        # `host`: another address of this machine for clients elsewhere (containers reach it on Docker's bridge).
        self._server = make_server(host, 0, self._app, threaded=True)
        self.url = f"http://{host}:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> LabelStudioStandIn:
        # werkzeug logs every request at INFO; benchmarks and tests only want failures.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()

    def _authorized(self, header: str) -> bool:
        scheme, _, value = header.partition(" ")
        if scheme == "Token":
            return self.legacy_enabled and value == self.legacy_token
        if scheme == "Bearer":
            try:
                claims = jwt.decode(value, SECRET, algorithms=["HS256"])
            except jwt.PyJWTError:
                return False
            return claims.get("token_type") == "access" and claims.get("generation") == self.access_generation
        return False

    def _app(self, environ, start_response):
        request = Request(environ)
        self.requests.append(
            (request.method, request.full_path, request.headers.get("Authorization", "").split(" ")[0])
        )
        if self.delay_s or request.path in self.stalls or request.full_path in self.stalls:
            time.sleep(self.delay_s + self.stalls.get(request.path, self.stalls.get(request.full_path, 0.0)))
        if request.path in self.redirects:
            response = Response("", 302, headers={"Location": self.redirects[request.path]})
        elif request.path == "/api/token/refresh/" and request.method == "POST":
            response = self._refresh(request)
        elif request.path.startswith("/api/") and not self._authorized(request.headers.get("Authorization", "")):
            response = Response('{"detail": "Authentication credentials were not provided."}', 401)
        elif request.path.startswith("/api/"):
            response = self._api(request)
        elif request.path.startswith("/data/"):
            response = self._data(request)
        else:
            response = self._file(self.media_root / "public" / request.path.lstrip("/"), "chunked" in request.args)
        return response(environ, start_response)

    def revoke_access_tokens(self) -> None:
        """Refuse every access token issued so far, before its expiry: what a client sees when its token
        expires in flight or Label Studio's clock runs ahead of its own."""
        self.access_generation += 1

    def add_project(self, label_config: str, image_urls: list[str], field: str = "image") -> int:
        """A project with one task per URL (its data.`field`), no annotations and no predictions; its id."""
        project_id = len(self.projects) + 1
        first_task = sum(len(project["tasks"]) for project in self.projects.values()) + 1
        tasks = [
            {"id": first_task + index, "data": {field: url}, "annotations": [], "predictions": [], "is_labeled": False}
            for index, url in enumerate(image_urls)
        ]
        self.projects[project_id] = {"title": f"project {project_id}", "label_config": label_config, "tasks": tasks}
        self.imported[project_id] = []
        return project_id

    def annotate(self, task_id: int, result: list[dict]) -> None:
        """An annotation saved on the task, as the task listing then shows it."""
        task = self.task(task_id)
        assert task is not None
        saved = "2026-12-08T10:00:00.000000Z"
        annotation = {"id": 1000 + task_id, "result": result, "created_at": saved, "updated_at": saved}
        task["annotations"].append(annotation)
        task["is_labeled"] = True

    def task(self, task_id: int) -> dict | None:
        """A task of any project, as stored (its predictions included)."""
        tasks = (task for project in self.projects.values() for task in project["tasks"])
        return next((task for task in tasks if task["id"] == task_id), None)

    def _api(self, request: Request) -> Response:
        if match := re.fullmatch(r"/api/projects/([0-9]+)/", request.path):
            project = self.projects.get(int(match[1]))
            if project is None:
                return Response('{"detail": "Not found."}', 404, content_type="application/json")
            body = {"id": int(match[1]), "title": project["title"], "label_config": project["label_config"]}
            return _json({**body, "task_number": len(project["tasks"])})
        if request.path == "/api/predictions/":
            task = self.task(int(request.args["task"]))
            return _json(task["predictions"] if task else [])
        if request.path == "/api/tasks/":
            tasks = self.projects[int(request.args["project"])]["tasks"]
            size, page = int(request.args.get("page_size", 100)), int(request.args.get("page", 1))
            listed = tasks[(page - 1) * size : page * size]
            predictions = sum(len(task["predictions"]) for task in tasks)
            return _json(
                {"tasks": listed, "total": len(tasks), "total_annotations": 0, "total_predictions": predictions}
            )
        if (
            match := re.fullmatch(r"/api/projects/([0-9]+)/import/predictions", request.path)
        ) and request.method == "POST":
            project_id = int(match[1])
            predictions = request.get_json()
            tasks = {task["id"]: task for task in self.projects[project_id]["tasks"]}
            for prediction in predictions:
                tasks[prediction["task"]]["predictions"].append(prediction)
            self.imported[project_id].extend(predictions)
            return _json({"created": len(predictions)}, 201)
        return Response('{"detail": "Not found."}', 404, content_type="application/json")

    def _refresh(self, request: Request) -> Response:
        refresh = (request.get_json(silent=True) or {}).get("refresh", "")
        try:
            claims = jwt.decode(refresh, SECRET, algorithms=["HS256"])
        except jwt.PyJWTError:
            return Response('{"detail": "Token is invalid"}', 401, content_type="application/json")
        self.refreshes += 1
        now = int(time.time())
        access = jwt.encode(
            {
                "token_type": "access",
                "user_id": claims["user_id"],
                "iat": now,
                "exp": now + self.access_lifetime_s,
                "generation": self.access_generation,
            },
            SECRET,
            algorithm="HS256",
        )
        return Response(f'{{"access": "{access}"}}', 200, content_type="application/json")

    def _data(self, request: Request) -> Response:
        if not self._authorized(request.headers.get("Authorization", "")):
            return Response('{"detail": "Authentication credentials were not provided."}', 401)
        if request.path.startswith("/data/upload/"):
            return self._file(self.media_root / "upload" / request.path[len("/data/upload/") :])
        if request.path.startswith("/data/local-files/"):
            return self._file(self.media_root / "local" / request.args.get("d", ""))
        return Response("not found", 404)

    @staticmethod
    def _file(path: Path, chunked: bool = False) -> Response:
        if not path.is_file():
            return Response("not found", 404)
        data = path.read_bytes()
        if chunked:  # a generator body has no Content-Length: only counting the bytes can stop it
            return Response((data[i : i + 4096] for i in range(0, len(data), 4096)), 200)
        return Response(data, 200, content_type="application/octet-stream")


def _json(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body), status, content_type="application/json")
