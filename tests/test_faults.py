"""Faults under load against real gunicorn (2 workers), a real Redis and the Label Studio stand-in.

Every click must end with a brush result or a clear JSON error: none lost, no 500. Redis killed and
restarted, a worker SIGKILLed, an image download stalling past the deadline. No timing assertions:
the figures are bench/load.py's job.
"""

from __future__ import annotations

import pytest
import requests

from tests.load_harness import LoadRig, PhaseReport, run_phase, warm_up

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


def assert_serving(rig: LoadRig) -> None:
    """After the fault is repaired, every worker answers a click on a new image."""
    rig.server.wait_ready(120)
    report = run_phase("after", rig.server, rig.images[:3], rig.images[-1], 2, 3, 120, seed=99)
    assert report.count("ok") == 6, report.summary()


def test_steady_load_has_no_errors_and_one_encode_per_image(rig):
    report = run_phase("steady", rig.server, rig.images[:3], rig.images[3], ANNOTATORS, CLICKS, 300, seed=1)
    assert_nothing_lost(report)
    assert report.count("ok") == ANNOTATORS * CLICKS, report.summary()
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
    assert report.count("ok") == ANNOTATORS * CLICKS, report.summary()  # the in-process cache carries on
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
