"""The soak (`make soak`, the last stage of `make test`): see tests/soak/harness.py for what runs and what is injected.

SOAK_TASKS sets the project's size (default 500, the full soak). The figures are
printed as one JSON line and written, with every RSS sample, to soak-report.json in the test's temporary folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest

from tests.soak.harness import FAULTS, SoakPlan, run_soak

pytestmark = pytest.mark.soak

HIT_RATE = 0.95  # of the first clicks after the cache filled
RSS_GROWTH = 1.10  # end of the walk over after warm-up, per process, for the web tier's and the RQ workers' processes
LOG_LINES_PER_CLICK = 12.0  # a click and its share of webhooks, jobs and encodes log about 8 (RQ logs each job twice)


def test_a_long_walk_with_restarts_and_a_full_cache_loses_nothing_and_stays_warm(tmp_path):
    plan = SoakPlan(tasks=int(os.environ.get("SOAK_TASKS", "500")))
    report = run_soak(plan, tmp_path)
    summary = report.summary()
    print("\nsoak:", json.dumps(summary))
    samples = [asdict(sample) for sample in report.rss]  # the RSS of every process each second, to plot
    (tmp_path / "soak-report.json").write_text(json.dumps({**summary, "rss_samples": samples}, indent=1))

    # Everything the walk was to do happened: each fault, a cache that filled, every task clicked and annotated.
    assert report.watch_error is None and len(report.faults) == len(FAULTS), summary
    assert report.filled_at is not None and len(report.counted_first_clicks) >= plan.tasks // 2, summary
    assert len(report.first_clicks) == plan.tasks

    assert report.server_errors == [], summary["server_errors"]
    assert all(outcome.kind == "ok" for outcome in report.outcomes), summary
    assert len(report.submitted) == plan.tasks, "every annotation was answered 'queued'"
    assert report.lost == set() and report.set_aside == [], summary
    assert report.hit_rate >= HIT_RATE, summary
    growth = report.rss_growth()
    assert growth["web"] <= RSS_GROWTH and growth["worker"] <= RSS_GROWTH, summary
    assert report.log_lines_per_click <= LOG_LINES_PER_CLICK, summary["top_log_lines"]
