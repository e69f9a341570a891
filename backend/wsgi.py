"""The WSGI entry point: `gunicorn backend.wsgi:app` (gunicorn.conf.py sets port, workers, threads)."""

from backend.app import build_app

app = build_app()
