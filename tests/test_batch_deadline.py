"""A "Retrieve predictions" batch (context null) against PREDICT_DEADLINE: answered task by task in chunks sized to
the time left, in bounded memory, with nothing left running, and a retry that finishes what is left without detecting
again. These batches name no project, so nothing is handed to a background run (that is tests/test_handover.py).

Small real models (the suite's SAM and GroundingDINO with random weights) on 40 distinct 320x240 images.
The deadline is set from one chunk's measured time, so that some chunks fit and most do not on any machine.
"""

from __future__ import annotations

import logging
import time
import tracemalloc
from dataclasses import replace

from backend.http.server import create_app
from backend.protocol.label_config import parse_label_config
from tests.assets import encode, recorded, smooth_object_image
from tests.conftest import make_client

CHUNK = 4  # GROUNDING_DINO_BATCH: tasks per chunk
SIZE = (320, 240)
MASK_BYTES = SIZE[0] * SIZE[1]  # one (H, W) bool mask
EMBEDDING_BYTES = 256 * 64 * 64 * 2  # one SAM embedding as float16 (held as an array and as its cached bytes)
PIXEL_BYTES = 3 * SIZE[0] * SIZE[1]  # one decoded RGB image


def task_urls(media_root, first_seed: int, count: int) -> list[str]:
    """`count` distinct images served by the Label Studio stand-in."""
    urls = []
    for seed in range(first_seed, first_seed + count):
        path = media_root / "upload" / "1" / f"stream-{seed}.jpg"
        if not path.exists():
            path.write_bytes(encode(smooth_object_image(*SIZE, seed)))
        urls.append(f"/data/upload/1/{path.name}")
    return urls


def batch(urls: list[str]) -> dict:
    body = recorded("03-predict-batch.json")
    body["tasks"] = [{"id": 100 + index, "data": {"image": url}} for index, url in enumerate(urls)]
    del body["project"]
    return body


def streaming_predictor(grounded_settings, media_root):
    """A loaded predictor that has run two chunks (so it knows each step's time), and the second one's seconds (the
    first pays for lazy set-ups)."""
    settings = replace(grounded_settings, grounding_dino_batch=CHUNK)
    _, predictor = make_client(settings)
    predictor.detector.get(120)
    config = parse_label_config(recorded("03-predict-batch.json")["label_config"])
    predictor.predict_batch(task_urls(media_root, 1000, CHUNK), config)
    started = time.monotonic()
    predictor.predict_batch(task_urls(media_root, 1000 + CHUNK, CHUNK), config)
    return settings, predictor, time.monotonic() - started


def model_passes(predictor) -> list[float]:
    """When each GroundingDINO and SAM encoder pass began, as the models themselves see it."""
    passes: list[float] = []
    record = lambda module, inputs: passes.append(time.time())  # noqa: E731
    predictor.detector.get(1).model.register_forward_pre_hook(record)
    predictor.models.get(1).segmenter.sam.image_encoder.register_forward_pre_hook(record)
    return passes


def test_a_batch_past_its_deadline_answers_the_tasks_done_and_leaves_nothing_running(
    grounded_settings, media_root, caplog
):
    tracemalloc.start()  # before the chunk that is timed, so the deadline is measured under the same overhead
    try:
        settings, predictor, chunk_s = streaming_predictor(grounded_settings, media_root)
        client = create_app(replace(settings, predict_deadline_s=2.5 * chunk_s), predictor).test_client()
        passes = model_passes(predictor)
        caplog.set_level(logging.INFO, logger="backend")
        tracemalloc.reset_peak()
        baseline = tracemalloc.get_traced_memory()[0]
        response = client.post("/predict", json=batch(task_urls(media_root, 0, 40)))
        answered = time.time()
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    time.sleep(2 * chunk_s)  # time enough for a chunk left running to show itself

    assert response.status_code == 200, response.json
    results = response.json["results"]
    done = [index for index, entry in enumerate(results) if entry != []]
    assert done == list(range(len(done))) and 0 < len(done) < 40, done
    assert all(entry["result"] for entry in results[: len(done)])
    assert [error["index"] for error in response.json["errors"]] == list(range(len(done), 40))
    assert {error["status"] for error in response.json["errors"]} == {503}
    # Nothing of the request ran after its answer: no model pass, no encode or detect logged.
    assert passes and max(passes) < answered
    late = [record.getMessage() for record in caplog.records if record.created > answered]
    assert not [line for line in late if line.startswith(("encoded", "detected"))], late
    # Memory: twice one chunk's working set (decoded images, masks of 3 objects an image, and each image's
    # embedding both as an array and as the bytes cached), plus the answers, which the response holds as Python
    # lists and as JSON (random-weight masks are speckled: ~0.3 MB of JSON a task). Holding every task's
    # embeddings alone would take 40 x 2 x 2 MiB, several times this bound.
    chunk_bytes = CHUNK * (PIXEL_BYTES + 3 * MASK_BYTES + 2 * EMBEDDING_BYTES)
    assert peak < 2 * chunk_bytes + 5 * len(response.data), (peak, chunk_bytes, len(response.data))


def test_a_retry_after_the_deadline_does_not_detect_again_what_was_detected(grounded_settings, media_root, caplog):
    settings, predictor, chunk_s = streaming_predictor(grounded_settings, media_root)
    body = batch(task_urls(media_root, 100, 3 * CHUNK))
    caplog.set_level(logging.INFO, logger="backend.inference")
    cut_short = create_app(replace(settings, predict_deadline_s=0.6 * chunk_s), predictor).test_client()
    first = cut_short.post("/predict", json=body)
    first_detected = detected_images(caplog)
    caplog.clear()
    retry = create_app(replace(settings, predict_deadline_s=600), predictor).test_client().post("/predict", json=body)
    retried = detected_images(caplog)

    assert first.status_code == 200 and 0 < sum(entry != [] for entry in first.json["results"]) < 3 * CHUNK
    assert retry.status_code == 200 and all(entry["result"] for entry in retry.json["results"])
    # Each image went through GroundingDINO once over both calls.
    assert first_detected and len(first_detected) + len(retried) == len(set(first_detected + retried)) == 3 * CHUNK


def detected_images(caplog) -> list[str]:
    """The images GroundingDINO ran on, from the predictor's one line per pass."""
    lines = [record.getMessage() for record in caplog.records if record.msg.startswith("detected")]
    return [digest for line in lines for digest in line.split(": ", 1)[1].split()]


def test_a_deadline_smaller_than_one_chunk_still_answers_tasks(grounded_settings, media_root):
    # The chunk measured takes chunk_s; a deadline of 0.6 chunk_s fits no whole chunk, but it fits two images.
    settings, predictor, chunk_s = streaming_predictor(grounded_settings, media_root)
    client = create_app(replace(settings, predict_deadline_s=0.6 * chunk_s), predictor).test_client()

    response = client.post("/predict", json=batch(task_urls(media_root, 200, 2 * CHUNK)))

    assert response.status_code == 200, response.json
    done = [entry for entry in response.json["results"] if entry != []]
    assert 1 <= len(done) < CHUNK and all(entry["result"] for entry in done), response.json
