"""Faults under load against real gunicorn (2 workers), a real Redis and the Label Studio stand-in.

Every click must end with a brush result or a clear JSON error: none lost, no 500. Redis killed and
restarted, a worker SIGKILLed, an image download stalling past the deadline. No timing assertions:
the figures are bench/load.py's job. So a click may also end in a 503 past PREDICT_DEADLINE when the
machine is busy: that is a clear error, with retry advice, and after each fault the service must
answer clicks again when the advice is followed.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
import redis
import requests

from tests.assets import REPO
from tests.load_harness import LoadRig, PhaseReport, click_body, run_phase, send_click, warm_up

ANNOTATORS, CLICKS = 4, 12


@pytest.fixture(scope="module")
def rig(sam_checkpoint, tmp_path_factory):
    with LoadRig(
        tmp_path_factory.mktemp("faults"), sam_checkpoint, workers=2, threads=4, predict_deadline_s=8.0
    ) as rig:
        warm_up(rig.server, rig.images[:3])
        yield rig


def assert_nothing_lost(report: PhaseReport) -> None:
    summary = report.summary()
    details = [(outcome.kind, outcome.status, outcome.detail) for outcome in report.outcomes if outcome.kind != "ok"]
    assert summary["requests"] == ANNOTATORS * CLICKS, summary
    assert summary["lost"] == 0 and summary["server_errors"] == 0, (summary, details)
    assert summary["ok"] + summary["clear_errors"] == summary["requests"]


def assert_serving(rig: LoadRig, clicks: int = 6, tries: int = 30) -> None:
    """After the fault is repaired, clicks on every image get a brush, following the 503s' retry advice."""
    rig.server.wait_ready(120)
    rng, session = random.Random(7), requests.Session()
    for click in range(clicks):
        image = rig.images[click % len(rig.images)]
        for _ in range(tries):
            outcome = send_click(session, rig.server.url, click_body(image, 77, rng), 60)
            assert outcome.kind in ("ok", "clear_error"), outcome
            if outcome.kind == "ok":
                break
            assert outcome.status == 503, outcome
            time.sleep(1)
        assert outcome.kind == "ok", outcome


def test_steady_load_loses_nothing_and_encodes_each_image_once(rig):
    report = run_phase("steady", rig.server, rig.images[:3], rig.images[3], ANNOTATORS, CLICKS, 300, seed=1)
    assert_nothing_lost(report)
    assert report.count("ok") > 0, report.summary()
    # All annotators' first click lands on the same new image at once: one encoder pass serves them all.
    assert report.duplicate_encodes == 0 and sum(report.encodes.values()) == 1, report.encodes


def test_redis_killed_and_restarted_under_load(rig):
    report = run_phase(
        "redis",
        rig.server,
        rig.images[:3],
        rig.images[4],
        ANNOTATORS,
        CLICKS,
        300,
        fault=rig.kill_redis,
        repair=rig.restart_redis,
        seed=2,
    )
    assert len(report.fault_log) == 2, report.fault_log
    assert_nothing_lost(report)
    assert report.count("ok") > 0, report.summary()
    assert_serving(rig)


def test_worker_killed_under_load(rig):
    before = rig.server.worker_pids()
    report = run_phase(
        "worker", rig.server, rig.images[:3], rig.images[5], ANNOTATORS, CLICKS, 300, fault=rig.kill_worker, seed=3
    )
    assert len(report.fault_log) == 1, report.fault_log
    assert_nothing_lost(report)
    assert_serving(rig)
    assert rig.server.worker_pids() != before and len(rig.server.worker_pids()) == 2


def test_stalled_image_download_gets_a_clear_error_and_others_go_on(rig):
    stalled = rig.images[0]
    report = run_phase(
        "stall",
        rig.server,
        rig.images[:3],
        stalled,
        ANNOTATORS,
        CLICKS,
        300,
        fault=rig.stall(stalled, 12.0),
        repair=rig.unstall(stalled),
        seed=4,
    )
    assert_nothing_lost(report)
    timeouts = [outcome for outcome in report.outcomes if outcome.kind == "clear_error"]
    assert timeouts and all(outcome.status == 503 for outcome in timeouts), report.summary()
    assert report.count("ok") > 0
    assert_serving(rig)
    assert requests.get(rig.server.url + "/livez", timeout=5).json() == {"status": "alive"}


HOLDER = """
import sys, time
from backend.cache.store import MemoryStore, ResilientStore
ResilientStore.LOCK_LEASE_S = 1.0
store = ResilientStore.from_url(sys.argv[1], MemoryStore(1 << 20))
with store.lock("sam:emb:test:lock", 60):
    print("held", flush=True)
    time.sleep(600)
"""


def test_encode_lock_of_a_killed_worker_is_freed_after_its_lease(redis_url):
    """A worker SIGKILLed while encoding must not keep the image's lock for ENCODE_LOCK_TIMEOUT."""
    client = redis.Redis.from_url(redis_url)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, redis_url], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(2.5)  # more than two leases: only renewal keeps it
        assert client.exists("sam:emb:test:lock") and 0 < client.pttl("sam:emb:test:lock") <= 1000
    finally:
        holder.kill()
        holder.wait()
    for _ in range(50):
        if not client.exists("sam:emb:test:lock"):
            break
        time.sleep(0.1)
    assert not client.exists("sam:emb:test:lock")
