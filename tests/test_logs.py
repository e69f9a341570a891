"""At INFO a process logs what an operator acts on: no library warnings or prints at start, no routine clean-up."""

from __future__ import annotations

import time

from tests.test_queue import grounding_env

IDLE_S = 6  # six registry clean-ups at the tests' WORKER_MAINTENANCE_INTERVAL of 1 s


def test_an_idle_worker_logs_no_routine_clean_ups_and_no_library_warnings_at_info(
    workers, grounding_dino_files, tmp_path
):
    workers.start(1, LOG_LEVEL="INFO", **grounding_env(grounding_dino_files))
    log_path = tmp_path / "worker0.log"
    deadline = time.monotonic() + 120
    while "loaded GroundingDINO" not in log_path.read_text():
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    time.sleep(IDLE_S)
    workers.stop()
    lines = log_path.read_text().splitlines()
    assert lines, "the worker logged nothing"
    assert not [line for line in lines if "cleaning" in line and "registr" in line]
    assert not [line for line in lines if "Warning" in line or "warn(" in line], "\n".join(lines)
    # Every line is one of ours (time, level, pid, logger: message), not a library's print.
    assert all(line[:4].isdigit() and (" INFO " in line or " WARNING " in line) for line in lines), "\n".join(lines)
