"""Load and faults: concurrent annotators on mostly cached images, with Redis, a worker and a download failing.

Runs real gunicorn (several workers), a real redis-server on a free port and the Label Studio stand-in,
all on loopback; each phase is bounded in clicks and in time, and the script stops by itself.

    python -m bench.load [--checkpoint sam.pth] [--workers 3] [--annotators 8] [--clicks 25]

Without --checkpoint it builds the small random-weight SAM of tests/assets.build_small_sam, so the
latencies are the serving stack's (HTTP, fetch, cache, decode, RLE), not ViT-B's. Prints one line of
JSON per phase and a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any folder

from tests.load_harness import LoadRig, PhaseReport, run_phase, warm_up  # noqa: E402


def table(reports: list[PhaseReport]) -> str:
    lines = [
        "| phase | fault injected | requests | ok | clear errors (status: count) | 500s | lost | "
        "retried connections | encodes (duplicates) | p50 / p95 ms client | p50 / p95 ms server |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        summary = report.summary()
        errors = {status: count for status, count in summary["statuses"].items() if status != "200"}
        lines.append(
            f"| {summary['phase']} | {'; '.join(summary['faults']) or 'none'} | {summary['requests']} | "
            f"{summary['ok']} | {summary['clear_errors']} {errors or ''} | {summary['server_errors']} | "
            f"{summary['lost']} | {summary['retried_connections']} | {summary['encodes']} "
            f"({summary['duplicate_encodes']}) | {summary['p50_ms']} / {summary['p95_ms']} | "
            f"{summary['server_p50_ms']} / {summary['server_p95_ms']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a SAM checkpoint in Meta's format (default: a small one)")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--annotators", type=int, default=8)
    parser.add_argument("--clicks", type=int, default=25, help="clicks per annotator and phase")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--deadline", type=float, default=5.0, help="PREDICT_DEADLINE of the server, seconds")
    parser.add_argument("--phase-seconds", type=float, default=240.0, help="time limit of each phase")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the stand-in's line per image request
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory(prefix="sam-load-") as work:
        with LoadRig(Path(work), args.checkpoint, args.workers, args.threads, args.images, args.deadline) as rig:
            cached, fresh = rig.images[:-4], rig.images[-4:]
            warm_up(rig.server, cached)
            phase = dict(annotators=args.annotators, clicks=args.clicks, time_limit_s=args.phase_seconds)
            stalled = cached[0]
            reports = [
                run_phase("steady", rig.server, cached, fresh[0], seed=1, **phase),
                run_phase(
                    "redis",
                    rig.server,
                    cached,
                    fresh[1],
                    fault=rig.kill_redis,
                    repair=rig.restart_redis,
                    seed=2,
                    **phase,
                ),
                run_phase("worker", rig.server, cached, fresh[2], fault=rig.kill_worker, seed=3, **phase),
            ]
            rig.server.wait_ready(120)
            reports.append(
                run_phase(
                    "stall",
                    rig.server,
                    cached,
                    fresh[3],
                    fault=rig.stall(stalled, 3 * args.deadline),
                    repair=rig.unstall(stalled),
                    seed=4,
                    **phase,
                )
            )
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{args.workers} gunicorn workers x {args.threads} threads, {args.annotators} annotators x {args.clicks} "
        f"clicks per phase, {args.images} images 1024x768, PREDICT_DEADLINE {args.deadline:g} s, "
        f"checkpoint {args.checkpoint or 'small random SAM (tests/assets.build_small_sam)'}, "
        f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs"
    )
    for report in reports:
        print(json.dumps(report.summary()))
    print()
    print(table(reports))


if __name__ == "__main__":
    main()
