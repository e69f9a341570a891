"""gunicorn settings from the environment (PORT, WORKERS, THREADS, LOG_LEVEL); read by plain `gunicorn`."""

import os
import tempfile

# Every worker writes its metrics here so that /metrics on any worker reports them all. It must be set
# before prometheus_client is first imported: the library picks its storage at import time.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="sam-backend-metrics-"))

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '9090')}"
workers = int(os.environ.get("WORKERS", "1"))
threads = int(os.environ.get("THREADS", "4"))
worker_class = "gthread"
# Model loading and a cold encode can take minutes on a CPU; Label Studio's own predict timeout is 100 s.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "300"))
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
accesslog = "-"


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
