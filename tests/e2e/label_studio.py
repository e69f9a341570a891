"""The real Label Studio for end-to-end tests: installed from PyPI into its own venv, run on loopback.

Label Studio pins its own Django, requests and label-studio-sdk stack, which conflicts with the
backend's, so it lives in a separate virtual environment: $LABEL_STUDIO_VENV if set, else
.cache/label-studio-<version>/ in the repository (ignored by git), created on first use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from backend.protocol.auth import LabelStudioCredentials
from tests.assets import REPO
from tests.services import free_port

LABEL_STUDIO_VERSION = "1.23.2"
INSTALL_TIMEOUT_S = 1200
START_TIMEOUT_S = 600


# Label Studio pins few of its dependencies; these are the ones a newer release broke. sentry-sdk 3.0 refuses the
# `send_default_pii` option Label Studio 1.23.2 passes at start-up ("TypeError: Unknown option").
LABEL_STUDIO_PINS = ("sentry-sdk==2.76.0",)


def installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    probe = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('label-studio'))"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_label_studio() -> Path:
    """The `label-studio` executable of the pinned version, installing it into its own venv if needed."""
    venv = Path(os.environ.get("LABEL_STUDIO_VENV") or REPO / ".cache" / f"label-studio-{LABEL_STUDIO_VERSION}")
    python = venv / "bin" / "python"
    if installed_version(python) != LABEL_STUDIO_VERSION:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
        subprocess.run(
            [python, "-m", "pip", "install", "-q", f"label-studio=={LABEL_STUDIO_VERSION}", *LABEL_STUDIO_PINS],
            check=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        print(f"installed label-studio=={LABEL_STUDIO_VERSION} into {venv} in {time.perf_counter() - started:.0f} s")
    return venv / "bin" / "label-studio"


class LabelStudioProcess:
    """`label-studio start` on 127.0.0.1 with a throwaway data directory and a user made from env."""

    username = "e2e@example.com"
    password = "e2e-password-1234"
    legacy_token = "e2e0legacy0token0000000000000000000000000"

    def __init__(self, executable: Path, work_dir: Path) -> None:
        self.executable = executable
        self.work_dir = work_dir
        self.files_root = work_dir / "files"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work_dir / "label-studio.log"
        self.process: subprocess.Popen | None = None
        self.start_seconds = 0.0

    def start(self) -> LabelStudioProcess:
        self.files_root.mkdir(parents=True, exist_ok=True)
        environment = {
            **os.environ,
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.work_dir / "data"),
            # Backend, webhooks and Label Studio all live on loopback here: both guards must be off.
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.files_root),
            "LABEL_STUDIO_USERNAME": self.username,
            "LABEL_STUDIO_PASSWORD": self.password,
            "LABEL_STUDIO_USER_TOKEN": self.legacy_token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        }
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self.executable, "start", "--host", "127.0.0.1", "--port", str(self.port), "--no-browser"],
                cwd=self.work_dir,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so stop() ends whatever it spawned
            )
        give_up_at = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < give_up_at:
            if self.process.poll() is not None:
                raise RuntimeError(f"label-studio exited with {self.process.returncode}; see {self.log_path}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    self.start_seconds = time.perf_counter() - started
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"label-studio did not answer /health in {START_TIMEOUT_S} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


class LabelStudioApi:
    """Label Studio's REST API with either kind of key, authenticated by the backend's own code."""

    def __init__(self, url: str, api_key: str) -> None:
        self.url = url
        self.credentials = LabelStudioCredentials(url, api_key, timeout_s=300)
        self.http = requests.Session()

    def call(self, method: str, path: str, expect: int | tuple[int, ...] = (200, 201), **kwargs) -> object:
        response = self.http.request(method, self.url + path, headers=self.credentials.header(), timeout=300, **kwargs)
        expected = (expect,) if isinstance(expect, int) else expect
        assert response.status_code in expected, f"{method} {path} -> {response.status_code}: {response.text[:500]}"
        return response.json() if response.content else None


if __name__ == "__main__":
    # `make label-studio`: install ahead of the e2e stage (make test runs it beside the unit suite).
    print(ensure_label_studio())
