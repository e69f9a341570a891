"""The bookkeeping lists under MODEL_DIR (imported tasks, encoded images): compacted, ascending whatever order the
webhooks come in, whole after a torn last line or several writing processes, and never the cause of a failed
request whose answer is ready."""

from __future__ import annotations

import multiprocessing

from backend.bookkeeping.coverage import COMPACT_MIN_BYTES, EncodedImages
from backend.bookkeeping.imports import ImportedTasks
from backend.cache.store import MemoryStore
from backend.project_files import ProjectFiles
from tests.bookkeeping_writer import key, tasks, write_entries
from tests.conftest import make_client
from tests.test_encode_ahead import PROJECT_1_IMAGES, click

TORN = b'{"id": 99, "ima'  # what a kill or a full disk leaves of an append


def test_an_import_appended_after_a_torn_line_is_read_whole(tmp_path):
    imported = ImportedTasks(ProjectFiles(tmp_path, 1))
    imported.append(tasks(1, 2, 3))
    with open(imported.path, "ab") as handle:
        handle.write(TORN)
    imported.append(tasks(4))
    assert [task.id for task in imported.following(1, 5)] == [2, 3, 4]
    assert [imported.take().id for _ in range(4)] == [1, 2, 3, 4]  # type: ignore[union-attr]
    assert imported.take() is None


def test_a_line_glued_by_an_older_version_costs_that_entry_only(tmp_path):
    imported = ImportedTasks(ProjectFiles(tmp_path, 1))
    imported.path.parent.mkdir(parents=True)
    imported.path.write_bytes(
        b'{"id": 1, "image": "a"}\n' + TORN + b'{"id": 2, "image": "b"}\n{"id": 3, "image": "c"}\n'
    )
    assert [task.id for task in imported.following(0, 5)] == [1, 3]
    assert [imported.take().id for _ in range(2)] == [1, 3]  # type: ignore[union-attr]
    assert imported.take() is None


def test_tasks_imported_out_of_order_or_twice_are_listed_once_in_ascending_order_and_taken_once(tmp_path):
    """Two webhooks handled side by side on two workers: the later tasks' arrives first; Label Studio sends one
    twice. The tasks after a task are still the next ids, and no task is encoded twice or left out."""
    imported = ImportedTasks(ProjectFiles(tmp_path, 1))
    imported.append(tasks(5, 6, 7))
    assert imported.take() == tasks(5)[0]
    imported.append(tasks(1, 2, 3))
    imported.append(tasks(6, 3))
    assert [task.id for task in imported.following(2, 3)] == [3, 5, 6]
    assert [task.id for task in imported.following(0, 10)] == [1, 2, 3, 5, 6, 7]
    taken = []
    while (task := imported.take()) is not None:
        taken.append(task.id)
    assert taken == [1, 2, 3, 6, 7]  # 5 was taken before the merge
    assert not imported.pending()


def test_the_coverage_list_survives_a_torn_line_and_is_compacted(tmp_path):
    encoded = EncodedImages(ProjectFiles(tmp_path, 1))
    encoded.record(key(1))
    with open(encoded.path, "ab") as handle:
        handle.write(TORN)
    encoded.record(key(2))
    assert encoded.newest_keys(10) == ([key(2), key(1)], False)
    for _ in range(2000):  # processes that each record the same four images, as restarts and workers do
        for n in range(4):
            encoded.record(key(n))
    assert encoded.path.stat().st_size <= 2 * COMPACT_MIN_BYTES
    store = MemoryStore(1 << 20)
    store.set(key(3), b"e", 60)
    assert encoded.coverage(store) == {"images": 4, "encoded_now": 1}  # keys 0-3, each listed once


def test_several_processes_appending_at_once_lose_no_entry(tmp_path):
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=write_entries, args=(str(tmp_path), first)) for first in range(1, 401, 100)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(300)
        assert writer.exitcode == 0
    listed = ImportedTasks(ProjectFiles(tmp_path, 1)).following(0, 1000)
    assert [task.id for task in listed] == list(range(1, 401))
    keys, _ = EncodedImages(ProjectFiles(tmp_path, 1)).newest_keys(1000)
    assert sorted(keys) == sorted(key(n) for n in range(1, 401, 5))


def test_an_unreadable_imported_task_list_never_fails_a_click_whose_answer_is_ready(settings, caplog):
    client, _ = make_client(settings)
    ImportedTasks(ProjectFiles(settings.model_dir, 1)).path.mkdir(parents=True)  # whatever makes reading it fail
    response = click(client, 1, PROJECT_1_IMAGES[0])
    assert response.status_code == 200
    assert response.json["results"][0]["result"]
    assert any("were not prefetched" in record.getMessage() for record in caplog.records)


def test_one_unreadable_coverage_list_leaves_status_answering_for_every_project(settings):
    client, _ = make_client(settings)
    EncodedImages(ProjectFiles(settings.model_dir, 1)).record(key(1))
    EncodedImages(ProjectFiles(settings.model_dir, 2)).path.mkdir(parents=True)
    response = client.get("/status")
    assert response.status_code == 200
    encoded = response.json["encoded_images"]
    assert encoded["1"] == {"images": 1, "encoded_now": 0}
    assert "cannot be read" in encoded["2"]["error"]


def test_a_compacted_list_keeps_the_newest_entry_last(tmp_path):
    encoded = EncodedImages(ProjectFiles(tmp_path, 1))
    count = COMPACT_MIN_BYTES // 100 + 10
    for n in range(count):
        encoded.record(key(n % 7 if n < count - 1 else 3))
    keys, _ = encoded.newest_keys(100)
    assert keys[0] == key(3) and len(keys) == 7
