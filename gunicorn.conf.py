"""gunicorn settings from the backend's own settings (HOST, PORT, WORKERS, THREADS, GUNICORN_TIMEOUT, LOG_LEVEL).

Read by plain `gunicorn backend.wsgi:app`. Reading them through `Settings.from_env()` here means a wrong value
anywhere stops gunicorn's master at start with a message naming the variable, before any worker starts.
"""

import os
import sys
import tempfile

from gunicorn.config import ControlSocket

from backend.config import Settings
from backend.errors import SettingsError

# Every worker writes its metrics here so that /metrics on any worker reports them all. It must be set
# before prometheus_client is first imported: the library picks its storage at import time.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="sam-backend-metrics-"))

try:
    _settings = Settings.from_env()
except SettingsError as error:
    sys.exit(f"configuration error: {error}")

bind = f"{_settings.host}:{_settings.port}"
# gunicorn's control socket (for `gunicornc`) defaults to one path for every gunicorn of the user: a second
# backend on the host took the first one's over, and left it without one when it stopped. One per port, in
# gunicorn's own folder for it ($XDG_RUNTIME_DIR, else ~/.gunicorn); a short name, as a socket's path may not
# exceed 107 bytes.
control_socket = os.path.join(os.path.dirname(ControlSocket.default), f"gunicorn-{_settings.port}.ctl")
workers = _settings.workers
threads = _settings.threads
worker_class = "gthread"
# Model loading and a cold encode can take minutes on a CPU; Label Studio's own predict timeout is 100 s.
timeout = _settings.gunicorn_timeout_s
loglevel = _settings.log_level.lower()
accesslog = "-"


def on_starting(server):
    from backend.http.access import open_to_the_network

    if warning := open_to_the_network(list(server.cfg.bind), _settings):
        server.log.warning(warning)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
