"""Active learning through the HTTP API: webhooks to a training set, a training to a served version,
rollback by pin, interrupted trainings and damaged versions. Real Redis, real Label Studio payloads
(their truncated brush RLE replaced by masks encoded with label-studio-sdk), real images over HTTP."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from label_studio_sdk.converter.brush import mask2rle
from rq.job import Job

from backend.decoders.serving import MAX_VARIANTS, ProjectDecoders
from backend.decoders.versions import PARTIAL_PREFIX, VersionStore
from backend.http.server import create_app
from backend.inference.queue import QueuePredictor
from backend.models.sam import decoder_state, load_sam, serialize_decoder_state
from backend.project_files import ProjectFiles
from backend.protocol.brush_rle import _encode_runs
from backend.training.dataset import AnnotationRecord, Region, TrainingSet
from backend.training.ingest import EVENT_ATTEMPTS, Inbox
from backend.training.trainer import train_project, training_lock
from tests.assets import REPO, recorded
from tests.conftest import backend_env, make_client
from tests.services import RedisServer
from tests.test_queue import Workers

BASE = "sam-vit_b"
IOU_BIAS = "mask_decoder.iou_prediction_head.layers.2.bias"


def annotation_event(
    action: str, project_id: int, annotation_id: int, task_id: int, image_url: str, mask: np.ndarray, label="Car"
) -> dict:
    """A recorded ANNOTATION_CREATED body, for another annotation, task, image and mask."""
    body = recorded("07-webhook-annotation-created.json")
    body["action"] = action
    body["project"]["id"] = project_id
    body["annotation"].update(id=annotation_id, task=task_id, project=project_id)
    height, width = mask.shape
    result = body["annotation"]["result"][0]
    result.update(original_width=width, original_height=height)
    result["value"].update(rle=mask2rle(mask.astype(np.uint8) * 255), brushlabels=[label])
    body["task"].update(id=task_id, project=project_id, data={"image": image_url})
    return body


def deleted_event(project_id: int, annotation_ids: list[int]) -> dict:
    body = recorded("09-webhook-annotations-deleted.json")
    body["project"]["id"] = project_id
    body["annotations"] = [{"id": annotation_id} for annotation_id in annotation_ids]
    return body


def predict_body(project_id: int, image_url: str) -> dict:
    body = recorded("05-predict-interactive-rectangle.json")
    body["project"] = f"{project_id}.1795623701"
    body["tasks"][0]["data"]["image"] = image_url
    return body


def post_webhook(client, body: dict) -> dict:
    response = client.post("/webhook", json=body)
    assert response.status_code == 200, response.json
    return response.json


def test_webhooks_build_the_training_set_and_train_a_version_that_serves(learning_settings, shapes):
    client, predictor = make_client(learning_settings)
    for annotation_id, seed in zip((101, 102, 103), (20, 21, 22), strict=True):
        url, mask = shapes[seed]
        answer = post_webhook(client, annotation_event("ANNOTATION_CREATED", 2, annotation_id, seed, url, mask))
        assert answer == {"status": "queued", "action": "ANNOTATION_CREATED", "project": 2}
    # The third annotation reaches TRAIN_AFTER_ANNOTATIONS: a training starts in the background.
    assert predictor.learning.wait_idle(600)
    listing = client.get("/versions?project=2").json
    (version,) = listing["versions"]
    assert version["name"] == "v1" and version["parent"] == "base"
    assert listing["training_set"] == {"annotations": 3, "masks": 3, "tasks": 3, "rejected_regions": 0}
    assert (version["train_masks"], version["held_out_masks"]) == (2, 1)
    assert version["held_out_miou_after"] > version["held_out_miou_before"] and version["accepted"]
    assert listing["serving"] == f"{BASE}-p2-v1" and version["serving"]
    assert listing["training"]["last"]["status"] == "trained"
    assert (Path(learning_settings.model_dir) / "2" / "versions" / "v1" / "decoder.pt").is_file()

    # Predictions for the project carry the new version; other projects keep the original SAM.
    served = client.post("/predict", json=predict_body(2, shapes[23][0]))
    assert served.status_code == 200, served.json
    (entry,) = served.json["results"]
    assert entry["model_version"] == f"{BASE}-p2-v1" and entry["result"]
    assert entry["score"] == min(region["score"] for region in entry["result"])
    other = client.post("/predict", json=predict_body(9, shapes[23][0]))
    assert other.json["results"][0]["model_version"] == BASE
    setup = client.post("/setup", json={**recorded("02-setup.json"), "project": "2.1795623701"})
    assert setup.json["model_version"] == f"{BASE}-p2-v1"

    # ANNOTATIONS_DELETED carries only ids; an update replaces the annotation's masks.
    post_webhook(client, deleted_event(2, [101]))
    url, mask = shapes[21]
    post_webhook(client, annotation_event("ANNOTATION_UPDATED", 2, 102, 21, url, mask, label="Wheel"))
    assert predictor.learning.wait_idle(60)
    listing = client.get("/versions?project=2").json
    assert listing["training_set"]["annotations"] == 2 and listing["annotations_since_training"] == 1
    records = {
        record.annotation_id: record for record in TrainingSet(ProjectFiles(learning_settings.model_dir, 2)).records()
    }
    assert set(records) == {102, 103} and records[102].regions[0].label == "Wheel"
    assert np.array_equal(records[102].regions[0].mask, mask)
    # Nothing is left waiting in the inbox.
    assert not list((Path(learning_settings.model_dir) / "2" / "inbox").glob("*.json"))


def test_start_training_webhook_trains_on_demand(learning_settings, shapes):
    client, predictor = make_client(replace(learning_settings, train_after_annotations=0, train_steps=2))
    for annotation_id, seed in zip((201, 202), (20, 21), strict=True):
        url, mask = shapes[seed]
        post_webhook(client, annotation_event("ANNOTATION_CREATED", 3, annotation_id, seed, url, mask))
    assert predictor.learning.wait_idle(60)
    assert client.get("/versions?project=3").json["versions"] == []  # TRAIN_AFTER_ANNOTATIONS=0: only on demand
    start = recorded("10-webhook-start-training.json")
    start["project"]["id"] = 3
    assert post_webhook(client, start)["status"] == "queued"
    assert predictor.learning.wait_idle(600)
    listing = client.get("/versions?project=3").json
    assert [version["name"] for version in listing["versions"]] == ["v1"]
    assert listing["versions"][0]["steps"] == 2


def test_bad_annotations_are_logged_and_listed_never_stored(learning_settings, shapes, caplog):
    client, predictor = make_client(learning_settings)
    url, mask = shapes[20]
    exif_url = "/data/upload/1/a5529614-car_400x300_exif6.png"  # shown 300 wide, 400 high
    truncated = recorded("07-webhook-annotation-created.json")  # its RLE is cut to 12 ints in the recording
    truncated["project"]["id"] = 4
    wrong_declared_size = annotation_event("ANNOTATION_CREATED", 4, 305, 5, url, mask)
    wrong_declared_size["annotation"]["result"][0]["original_width"] = 100
    events = [
        truncated,
        annotation_event("ANNOTATION_CREATED", 4, 302, 2, url, mask, label="Truck"),
        annotation_event("ANNOTATION_CREATED", 4, 303, 3, url, np.zeros_like(mask)),
        annotation_event("ANNOTATION_CREATED", 4, 304, 4, exif_url, np.ones((300, 400), bool)),
        wrong_declared_size,
    ]
    with caplog.at_level(logging.WARNING, logger="backend.training"):
        for event in events:
            assert post_webhook(client, event)["status"] == "queued"
        assert predictor.learning.wait_idle(120)
    reasons = {
        entry["annotation"]: entry["reason"]
        for entry in TrainingSet(ProjectFiles(learning_settings.model_dir, 4)).rejections()
    }
    assert "rle is not a list of byte values" in reasons[1]
    assert "label 'Truck' is not in the label config (Car, Wheel)" in reasons[302]
    assert reasons[303] == "the mask is empty"
    assert reasons[304] == "mask is 400x300 but the image is 300x400"
    assert "not 100x" in reasons[305]
    logged = caplog.text
    assert all(reason in logged for reason in reasons.values())
    listing = client.get("/versions?project=4").json
    assert listing["training_set"] == {"annotations": 0, "masks": 0, "tasks": 0, "rejected_regions": 5}
    assert listing["annotations_since_training"] == 0


def test_webhooks_that_cannot_be_recorded_are_4xx_and_others_are_acknowledged(learning_settings):
    client, _ = make_client(learning_settings)
    no_project = recorded("07-webhook-annotation-created.json")
    del no_project["project"]
    response = client.post("/webhook", json=no_project)
    assert response.status_code == 400 and "project.id" in response.json["error"]
    no_task = recorded("08-webhook-annotation-updated.json")
    del no_task["task"]
    response = client.post("/webhook", json=no_task)
    assert response.status_code == 400 and "'annotation' and 'task'" in response.json["error"]
    bad_ids = recorded("09-webhook-annotations-deleted.json")
    bad_ids["annotations"] = "1"
    assert client.post("/webhook", json=bad_ids).status_code == 400
    unknown = recorded("10-webhook-start-training.json")
    unknown["project"]["id"] = 99
    answer = post_webhook(client, unknown)
    assert answer["status"] == "ignored" and "no training data" in answer["reason"]
    assert post_webhook(client, {"action": "PROJECT_UPDATED", "project": {"id": 1}})["status"] == "ignored"
    assert client.get("/versions?project=abc").status_code == 400
    assert client.get("/versions").json["fine_tuning"] == {"supported": True, "reason": None}  # SAM ViT: it can


def test_events_recorded_by_a_process_that_died_are_applied_on_start(learning_settings, shapes):
    files = ProjectFiles(learning_settings.model_dir, 5)
    url, mask = shapes[22]
    Inbox(files).record(annotation_event("ANNOTATION_CREATED", 5, 501, 22, url, mask))
    client, predictor = make_client(learning_settings)
    predictor.learning.start()
    assert predictor.learning.wait_idle(60)
    assert client.get("/versions?project=5").json["training_set"]["annotations"] == 1
    assert not Inbox(files).pending()


def peak_rss_since_reset_bytes() -> int:
    """The process's peak resident memory since `reset_peak_rss` (Linux's VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak to the current resident size


def test_a_brush_declaring_a_huge_image_is_rejected_undecoded_and_the_next_event_applied(learning_settings, shapes):
    """32768x32767 pixels, all inside: an RLE of under 1 MB that would decode to 4 GiB of RGBA and a 1 GiB mask."""
    client, predictor = make_client(learning_settings)
    url, mask = shapes[20]
    # The valid annotation's image is fetched and encoded once first, so that the measured round only repeats work.
    post_webhook(client, annotation_event("ANNOTATION_CREATED", 13, 1300, 20, url, mask))
    assert predictor.learning.wait_idle(120)
    huge = annotation_event("ANNOTATION_CREATED", 13, 1301, 21, url, mask)
    width, height = 32768, 32767
    values = 4 * width * height
    region = huge["annotation"]["result"][0]
    region.update(original_width=width, original_height=height)
    region["value"]["rle"] = _encode_runs(values, np.array([values]), np.array([255]))
    assert len(region["value"]["rle"]) < 1024 * 1024

    reset_peak_rss()
    before = peak_rss_since_reset_bytes()
    assert post_webhook(client, huge)["status"] == "queued"
    post_webhook(client, annotation_event("ANNOTATION_CREATED", 13, 1302, 20, url, mask))
    assert predictor.learning.wait_idle(120)
    risen = peak_rss_since_reset_bytes() - before

    assert risen < 50 * 1024 * 1024, f"resident memory rose {risen / 2**20:.0f} MiB"
    rejected = TrainingSet(ProjectFiles(learning_settings.model_dir, 13)).rejections()
    assert [(entry["annotation"], entry["reason"]) for entry in rejected] == [
        (1301, "original_width x original_height is 32768x32767 = 1073709056 pixels, over MAX_IMAGE_PIXELS (40000000)")
    ]
    listing = client.get("/versions?project=13").json
    assert listing["training_set"]["annotations"] == 2 and listing["annotations_since_training"] == 2
    assert not Inbox(ProjectFiles(learning_settings.model_dir, 13)).pending()


APPLY_RECORDED_EVENTS = """
import contextlib

from backend.app import build_app
from backend.config import Settings
from backend.models.loader import ModelNotReady

predictor = build_app(Settings.from_env()).extensions["backend"].predictor
assert predictor.learning.wait_idle(120)
with contextlib.suppress(ModelNotReady):  # exit only once no loader thread runs
    predictor.detector.get(120)
"""


def test_an_event_that_kills_the_process_applying_it_is_set_aside_after_a_few_restarts(
    learning_settings, shapes, label_studio, tmp_path
):
    """The backend applies recorded events as it starts; one that kills it (here: killed while it fetches the
    image, as the kernel's out-of-memory killer would) must not kill every start after it."""
    files = ProjectFiles(learning_settings.model_dir, 14)
    url, mask = shapes[21]
    deadly_image = "/data/upload/shapes/deadly.png"
    Inbox(files).record(annotation_event("ANNOTATION_CREATED", 14, 1401, 21, deadly_image, mask))
    Inbox(files).record(annotation_event("ANNOTATION_CREATED", 14, 1402, 21, url, mask))
    env = backend_env(learning_settings, tmp_path)

    def fetches(path: str) -> int:
        return sum(full_path.partition("?")[0] == path for _, full_path, _ in label_studio.requests)

    label_studio.stalls[deadly_image] = 60.0
    try:
        for _ in range(EVENT_ATTEMPTS):
            fetched = fetches(deadly_image)
            start = subprocess.Popen([sys.executable, "-c", APPLY_RECORDED_EVENTS], cwd=REPO, env=env)
            deadline = time.monotonic() + 120
            while fetches(deadly_image) == fetched:
                assert start.poll() is None and time.monotonic() < deadline, "the start never fetched the image"
                time.sleep(0.05)
            start.kill()
            assert start.wait() == -9
        start = subprocess.run([sys.executable, "-c", APPLY_RECORDED_EVENTS], cwd=REPO, env=env, timeout=300)
    finally:
        del label_studio.stalls[deadly_image]
    assert start.returncode == 0
    assert fetches(deadly_image) == EVENT_ATTEMPTS  # the last start set the event aside without applying it
    (set_aside,) = files.failed.glob("*.json")
    assert json.loads(set_aside.read_text())["annotation"]["id"] == 1401
    error = files.failed / f"{set_aside.stem}.error.txt"
    assert error.read_text() == f"the process applying it died in each of {EVENT_ATTEMPTS} attempts\n"
    assert [record.annotation_id for record in TrainingSet(files).records()] == [1402]
    assert not list(files.inbox.iterdir())


def write_version(settings, project_id: int, score_shift: float, accepted: bool = True) -> str:
    """A version whose IoU head scores `score_shift` higher than the original's: served scores show it."""
    state = decoder_state(load_sam(Path(settings.sam_checkpoint), decoder_runtime="torch").sam)
    state[IOU_BIAS] = state[IOU_BIAS] + score_shift
    metrics = {"held_out_miou_before": 0.5, "held_out_miou_after": 0.6, "accepted": accepted, "parent": "base"}
    return (
        VersionStore(ProjectFiles(settings.model_dir, project_id)).write(serialize_decoder_state(state), metrics).name
    )


def served(client, project_id: int, image_url: str) -> tuple[str, float]:
    """The model_version and score of a click, on a fresh task so no earlier mask is fed back."""
    body = recorded("04-predict-interactive-keypoints.json")
    body["project"] = f"{project_id}.1795623701"
    body["tasks"][0]["data"]["image"] = image_url
    body["tasks"][0]["id"] = time.monotonic_ns()
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    entry = response.json["results"][0]
    return entry["model_version"], entry["score"]


def test_pin_rolls_back_to_an_earlier_version_or_the_original(learning_settings, shapes):
    image = shapes[24][0]
    _, base_score = served(make_client(learning_settings)[0], 6, image)
    # Shifts that keep every score inside 0-1, where scores are clipped, so each version's shows as itself.
    assert 0 < base_score < 0.3
    assert write_version(learning_settings, 6, 0.2) == "v1"
    assert write_version(learning_settings, 6, 0.4) == "v2"
    assert write_version(learning_settings, 6, 0.6, accepted=False) == "v3"  # scored worse: kept, not served
    client, _ = make_client(learning_settings)
    version, score = served(client, 6, image)
    assert version == f"{BASE}-p6-v2" and score == pytest.approx(base_score + 0.4, abs=1e-3)
    listing = client.get("/versions?project=6").json
    assert [(v["name"], v["serving"]) for v in listing["versions"]] == [("v1", False), ("v2", True), ("v3", False)]

    pinned, _ = make_client(replace(learning_settings, model_version_pin="6=v1"))
    version, score = served(pinned, 6, image)
    assert version == f"{BASE}-p6-v1" and score == pytest.approx(base_score + 0.2, abs=1e-3)
    assert pinned.get("/versions?project=6").json["pinned"] == "v1"

    original, _ = make_client(replace(learning_settings, model_version_pin="base"))
    version, score = served(original, 6, image)
    assert version == BASE and score == pytest.approx(base_score, abs=1e-5)


def test_clicks_and_setup_are_answered_while_another_projects_decoder_loads(learning_settings, shapes):
    """Project 16's v1 loads from a FIFO in place of its decoder.pt, so its load lasts until the test writes the
    weights; meanwhile project 15 (served by its own fine-tuned decoder) gets its click and 16 its /setup."""
    client, _ = make_client(learning_settings)
    image = shapes[24][0]
    write_version(learning_settings, 15, 1.0)
    assert served(client, 15, image)[0] == f"{BASE}-p15-v1"  # loaded before project 16's load begins
    write_version(learning_settings, 16, 2.0)
    weights_path = Path(learning_settings.model_dir) / "16" / "versions" / "v1" / "decoder.pt"
    weights = weights_path.read_bytes()
    weights_path.unlink()
    os.mkfifo(weights_path)

    answers: dict[str, object] = {}

    def answer(name: str, call) -> threading.Thread:
        thread = threading.Thread(target=lambda: answers.__setitem__(name, call()), daemon=True)
        thread.start()
        return thread

    loading = answer("16", lambda: served(client, 16, image))
    writer = None
    try:
        deadline = time.monotonic() + 120
        while writer is None:  # opening the FIFO for writing succeeds once the load has opened it for reading
            try:
                writer = os.open(weights_path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert loading.is_alive() and time.monotonic() < deadline, answers
                time.sleep(0.05)
        setup_body = {**recorded("02-setup.json"), "project": "16.1795623701"}
        others = [
            answer("15", lambda: served(client, 15, image)),
            answer("setup 16", lambda: client.post("/setup", json=setup_body).json),
        ]
        for thread in others:
            thread.join(60)
        assert answers.get("15", (None,))[0] == f"{BASE}-p15-v1", "project 15's click waited for 16's load"
        assert answers.get("setup 16") == {"model_version": f"{BASE}-p16-v1"}, "/setup waited for the load"
        assert loading.is_alive()
    finally:
        if writer is not None:
            os.set_blocking(writer, True)
            with os.fdopen(writer, "wb") as fifo:
                fifo.write(weights)
        loading.join(120)
    assert answers["16"][0] == f"{BASE}-p16-v1"


def test_loaded_decoders_stay_bounded_however_many_projects_are_served(learning_settings):
    base = load_sam(Path(learning_settings.sam_checkpoint), decoder_runtime="torch")
    state = decoder_state(base.sam)
    metrics = {"held_out_miou_before": 0.5, "held_out_miou_after": 0.6, "accepted": True, "parent": "base"}
    decoders = ProjectDecoders(learning_settings.model_dir, lambda: BASE)
    loaded = []
    for project_id in range(100, 100 + MAX_VARIANTS + 4):
        VersionStore(ProjectFiles(learning_settings.model_dir, project_id)).write(
            serialize_decoder_state(state), metrics
        )
        segmenter, version = decoders.serving(project_id, base)
        assert version == f"{BASE}-p{project_id}-v1" and segmenter is not base
        loaded.append(weakref.ref(segmenter))
        del segmenter
    gc.collect()
    assert sum(ref() is not None for ref in loaded) == MAX_VARIANTS
    # A project whose decoder was let go is served again, loading it anew.
    assert decoders.serving(100, base)[1] == f"{BASE}-p100-v1"


def test_a_version_superseded_by_a_newer_one_is_let_go(learning_settings):
    """Each training's new version was loaded beside the ones before it, so a worker held every version of a project
    until MAX_VARIANTS newer ones pushed them out; the soak's worker RSS grew with each training. Once the newer
    version serves, the one it replaces is no longer held."""
    base = load_sam(Path(learning_settings.sam_checkpoint), decoder_runtime="torch")
    state = decoder_state(base.sam)
    metrics = {"held_out_miou_before": 0.5, "held_out_miou_after": 0.6, "accepted": True, "parent": "base"}
    decoders = ProjectDecoders(learning_settings.model_dir, lambda: BASE)
    store = VersionStore(ProjectFiles(learning_settings.model_dir, 120))
    served_before = []
    for number in (1, 2, 3):
        store.write(serialize_decoder_state(state), {**metrics, "held_out_miou_after": 0.6 + number / 100})
        segmenter, version = decoders.serving(120, base)
        assert version == f"{BASE}-p120-v{number}"
        served_before.append(weakref.ref(segmenter))
        del segmenter
    gc.collect()
    assert [ref() is not None for ref in served_before] == [False, False, True]


def test_damaged_version_is_skipped_with_an_error_and_the_previous_serves(learning_settings, shapes, caplog):
    write_version(learning_settings, 7, 1.0)
    write_version(learning_settings, 7, 2.0)
    broken_weights = Path(learning_settings.model_dir) / "7" / "versions" / "v2" / "decoder.pt"
    broken_weights.write_bytes(broken_weights.read_bytes()[:1000])
    write_version(learning_settings, 7, 3.0)
    (Path(learning_settings.model_dir) / "7" / "versions" / "v3" / "metrics.json").write_text("{not json")
    client, _ = make_client(learning_settings)
    with caplog.at_level(logging.ERROR):
        version, _ = served(client, 7, shapes[24][0])
    assert version == f"{BASE}-p7-v1"
    assert "version v2 cannot serve, skipped: v2: decoder.pt does not match the checksum" in caplog.text
    assert "version v3 is unreadable, skipped" in caplog.text
    listing = client.get("/versions?project=7").json
    assert listing["serving"] == f"{BASE}-p7-v1"
    assert [broken["name"] for broken in listing["unreadable"]] == ["v3"]


def store_training_set(settings, project_id: int, shapes: dict, seeds: tuple[int, ...]) -> None:
    training_set = TrainingSet(ProjectFiles(settings.model_dir, project_id))
    for seed in seeds:
        url, mask = shapes[seed]
        training_set.put(AnnotationRecord(seed, seed, url, [Region.of_mask(f"r{seed}", "Car", mask)]))


def test_training_interrupted_by_an_error_writes_nothing_and_frees_the_lock(learning_settings, shapes):
    settings = replace(learning_settings, train_steps=3, train_batch_size=1, train_correction_rounds=0)
    store_training_set(settings, 8, shapes, (20, 21, 22))
    write_version(settings, 8, 1.0)
    client, predictor = make_client(settings)

    def fail_mid_way(step: int, loss: float) -> None:
        if step == 1:
            raise RuntimeError("interrupted at step 1")

    with pytest.raises(RuntimeError, match="interrupted"):
        train_project(8, settings, predictor.training_resources(), on_step=fail_mid_way)
    versions_dir = Path(settings.model_dir) / "8" / "versions"
    assert sorted(entry.name for entry in versions_dir.iterdir()) == ["v1"]
    assert served(client, 8, shapes[24][0])[0] == f"{BASE}-p8-v1"
    result = train_project(8, settings, predictor.training_resources())
    assert result.status == "trained" and result.version == "v2" and result.metrics["parent"] == "v1"


KILLED_TRAINING = """
import json, os, signal, sys
from backend.config import Settings
from backend.decoders import versions
from backend.training.trainer import train_project

settings = json.loads(sys.argv[1])
settings["allowed_image_hosts"] = tuple(settings["allowed_image_hosts"])
real_fsync_directory = versions.fsync_directory

def die_once_the_weights_are_written(path):
    # The new version's files are on disk but not yet renamed into place: the worst moment to die.
    if path.name.startswith(versions.PARTIAL_PREFIX):
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync_directory(path)

versions.fsync_directory = die_once_the_weights_are_written
train_project(int(sys.argv[2]), Settings(**settings))
"""


def test_training_killed_while_writing_leaves_no_version_and_the_next_one_cleans_up(learning_settings, shapes):
    settings = replace(learning_settings, train_steps=2, train_batch_size=1, train_correction_rounds=0)
    store_training_set(settings, 10, shapes, (20, 21, 22))
    write_version(settings, 10, 1.0)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_TRAINING, json.dumps(asdict(settings)), "10"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    versions_dir = Path(settings.model_dir) / "10" / "versions"
    (partial,) = [entry for entry in versions_dir.iterdir() if entry.name.startswith(PARTIAL_PREFIX)]
    assert (partial / "decoder.pt").is_file()  # the dead process had written its weights

    client, predictor = make_client(settings)
    assert served(client, 10, shapes[24][0])[0] == f"{BASE}-p10-v1"
    assert [version["name"] for version in client.get("/versions?project=10").json["versions"]] == ["v1"]
    # The dead holder's Redis lock expires after TRAIN_LOCK_TTL; then training runs and clears the leftovers.
    deadline = time.monotonic() + 30
    while (result := train_project(10, settings, predictor.training_resources())).status == "busy":
        assert time.monotonic() < deadline, "the killed training's lock never expired"
        time.sleep(0.5)
    assert result.status == "trained" and result.version == "v2"
    assert sorted(entry.name for entry in versions_dir.iterdir()) == ["v1", "v2"]


def test_two_trainings_of_one_project_never_run_at_once(learning_settings):
    files = ProjectFiles(learning_settings.model_dir, 11)
    with training_lock(files, learning_settings):
        assert train_project(11, learning_settings).status == "busy"
    # Another host (here: another Redis client) holding the Redis lock keeps this one out too.
    other_host = redis.Redis.from_url(learning_settings.redis_url).lock("sam:train-lock:11", timeout=30)
    assert other_host.acquire(blocking=False)
    try:
        assert train_project(11, learning_settings).status == "busy"
    finally:
        other_host.release()
    result = train_project(11, learning_settings)
    assert result.status == "skipped" and "at least 2 tasks" in result.reason


def test_decoder_variant_shares_the_encoder_and_its_cache_key(sam_checkpoint):
    base = load_sam(sam_checkpoint, decoder_runtime="torch")
    state = decoder_state(base.sam)
    state[IOU_BIAS] = state[IOU_BIAS] + 1.0
    variant = base.with_decoder_state(state)
    assert variant.identity == base.identity and variant.sam.image_encoder is base.sam.image_encoder
    assert variant.sam.mask_decoder is not base.sam.mask_decoder
    assert not torch.equal(decoder_state(variant.sam)[IOU_BIAS], decoder_state(base.sam)[IOU_BIAS])
    with pytest.raises(ValueError, match="do not match"):
        base.with_decoder_state({key: value for key, value in state.items() if key != IOU_BIAS})


def training_worker_env(settings, **overrides: str) -> dict[str, str]:
    """A queue worker's environment for tiny trainings on the test's MODEL_DIR and Label Studio: one after every
    second annotation, one mask a step, no simulated corrections."""
    return {
        "MODEL_DIR": settings.model_dir,
        "LABEL_STUDIO_URL": settings.label_studio_url,
        "LABEL_STUDIO_API_KEY": settings.label_studio_api_key,
        "TORCH_THREADS": "2",
        "TRAIN_AFTER_ANNOTATIONS": "2",
        "TRAIN_BATCH_SIZE": "1",
        "TRAIN_CORRECTION_ROUNDS": "0",
        **overrides,
    }


def test_queue_mode_workers_apply_webhooks_train_and_serve_the_version(settings, shapes, sam_checkpoint, tmp_path):
    """INFERENCE=queue: the web tier only records and enqueues; a worker process applies, trains and serves.
    The trainings are tiny, so v1 is pinned to serve whatever it scored."""
    server = RedisServer(tmp_path).start()
    pool = Workers(server.url, sam_checkpoint, tmp_path)
    try:
        queue_settings = replace(
            settings,
            inference="queue",
            redis_url=server.url,
            predict_deadline_s=120,
            job_timeout_s=60,
            model_version_pin="12=v1",
        )
        web = create_app(queue_settings, QueuePredictor(queue_settings, redis.Redis.from_url(server.url))).test_client()
        pool.start(1, **training_worker_env(settings, TRAIN_STEPS="2"), JOB_TIMEOUT="60", MODEL_VERSION_PIN="12=v1")
        for annotation_id, seed in zip((1201, 1202), (20, 21), strict=True):
            url, mask = shapes[seed]
            event = annotation_event("ANNOTATION_CREATED", 12, annotation_id, seed, url, mask)
            assert post_webhook(web, event)["status"] == "queued"
        deadline = time.monotonic() + 600
        while not (listing := web.get("/versions?project=12").json)["training"]["last"]:
            assert time.monotonic() < deadline, listing
            time.sleep(1)
        assert listing["training"]["last"]["status"] == "trained"
        assert [version["name"] for version in listing["versions"]] == ["v1"]
        assert listing["serving"] == f"{BASE}-p12-v1" and listing["training_set"]["annotations"] == 2
        response = web.post("/predict", json=predict_body(12, shapes[23][0]))
        assert response.status_code == 200, response.json
        assert response.json["results"][0]["model_version"] == f"{BASE}-p12-v1"
    finally:
        pool.stop()
        server.stop()


def test_queue_mode_workers_with_another_model_dir_than_the_web_tier_refuse_to_learn(
    settings, shapes, sam_checkpoint, tmp_path
):
    """The web tier records webhook events in its MODEL_DIR; a worker that mounts another folder would find
    nothing there to apply, and say nothing. One started after the web tier refuses to start; one started
    before it fails its training jobs, naming both folders, and the events stay recorded."""
    server = RedisServer(tmp_path).start()
    pool = Workers(server.url, sam_checkpoint, tmp_path)
    worker_model_dir = tmp_path / "worker-models"
    refused = None
    try:
        pool.start(1, MODEL_DIR=str(worker_model_dir), LABEL_STUDIO_URL=settings.label_studio_url)
        queue_settings = replace(settings, inference="queue", redis_url=server.url)
        predictor = QueuePredictor(queue_settings, redis.Redis.from_url(server.url))
        web = create_app(queue_settings, predictor).test_client()
        predictor.warm_up()
        url, mask = shapes[20]
        assert post_webhook(web, annotation_event("ANNOTATION_CREATED", 17, 1701, 20, url, mask))["status"] == "queued"
        queue = predictor.training_queue
        deadline = time.monotonic() + 300
        while not (ended := queue.finished_job_registry.get_job_ids() + queue.failed_job_registry.get_job_ids()):
            assert time.monotonic() < deadline, "the training job never ran"
            time.sleep(0.2)
        (job_id,) = ended
        failure = Job.fetch(job_id, connection=predictor.connection).latest_result().exc_string or ""
        assert f"MODEL_DIR {worker_model_dir} on " in failure
        assert f"is not the web tier's MODEL_DIR ({settings.model_dir} on " in failure
        assert len(Inbox(ProjectFiles(settings.model_dir, 17)).pending()) == 1
        assert not (worker_model_dir / "17").exists()

        env = dict(os.environ, REDIS_URL=server.url, MODEL_DIR=str(worker_model_dir))
        env["SAM_CHECKPOINT"] = str(sam_checkpoint)
        refused = subprocess.Popen(
            [sys.executable, "-m", "backend", "worker"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
        )
        _, stderr = refused.communicate(timeout=120)
        assert refused.returncode == 1
        assert "the worker cannot start: MODEL_DIR" in stderr and f"({settings.model_dir} on " in stderr
    finally:
        if refused is not None and refused.poll() is None:
            refused.kill()
            refused.wait()
        pool.stop()
        server.stop()
