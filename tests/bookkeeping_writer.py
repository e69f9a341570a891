"""A process writing the bookkeeping lists (tests/test_bookkeeping.py runs several at once). Kept apart from the
tests so that a spawned process imports no model library."""

from __future__ import annotations

from backend.bookkeeping.coverage import EncodedImages
from backend.bookkeeping.imports import ImportedTask, ImportedTasks
from backend.project_files import ProjectFiles


def key(n: int) -> str:
    return f"sam:emb:vit_b-1111:{n:064x}"


def tasks(*ids: int) -> list[ImportedTask]:
    return [ImportedTask(task_id, f"/data/upload/1/{task_id}.jpg") for task_id in ids]


def write_entries(model_dir: str, first: int) -> None:
    """Tasks `first` to `first` + 99 appended five at a time, each fifth one's key recorded."""
    imported, encoded = ImportedTasks(ProjectFiles(model_dir, 1)), EncodedImages(ProjectFiles(model_dir, 1))
    for n in range(first, first + 100, 5):
        imported.append(tasks(*range(n, n + 5)))
        encoded.record(key(n))
