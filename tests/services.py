"""Real services for tests and benchmarks: a redis-server process on a free port, and inference workers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis
from rq import Worker

from backend.inference.queue import CLICK_LANE_SUFFIX

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A real redis-server process owned by the test suite."""

    def __init__(self, directory: Path, *options: str) -> None:
        """`options`: more redis-server arguments, e.g. "--maxmemory", "8mb"."""
        self.directory = directory
        self.options = options
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: apt-get install redis-server")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def pause(self) -> None:
        """Hung, not gone: connections are still accepted by the kernel, and nothing answers them."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)  # a paused server would not act on the terminate
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def model_workers(connection: redis.Redis) -> list[Worker]:
    """Registered workers, without each one's clicks-only lane (same process, its own RQ name)."""
    return [worker for worker in Worker.all(connection=connection) if not worker.name.endswith(CLICK_LANE_SUFFIX)]


# Short times, so that the tests of a worker's faults and of its leases run in seconds.
WORKER_ENV = {"JOB_TIMEOUT": "6", "WORKER_TTL": "3", "WORKER_MAINTENANCE_INTERVAL": "1", "TORCH_THREADS": "1"}


class Workers:
    """`python -m backend worker` processes, started and killed by the test."""

    def __init__(self, redis_url: str, checkpoint: Path, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.checkpoint = checkpoint
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []

    def start(self, count: int, **extra_env: str) -> Workers:
        env = dict(os.environ, REDIS_URL=self.redis_url, SAM_CHECKPOINT=str(self.checkpoint), **WORKER_ENV)
        env.update(extra_env)
        for _ in range(count):
            log = open(self.log_dir / f"worker{len(self.processes)}.log", "w")  # noqa: SIM115 (lives with the process)
            self.processes.append(
                subprocess.Popen([sys.executable, "-m", "backend", "worker"], cwd=REPO, env=env, stdout=log, stderr=log)
            )
        self.wait_alive()
        return self

    def wait_alive(self, timeout_s: float = 120) -> None:
        """Until every running process is a registered worker: counted by pid, since a killed worker's
        registration lingers for its TTL and would otherwise stand in for one still loading its models."""
        connection = redis.Redis.from_url(self.redis_url)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            running = {process.pid for process in self.processes if process.poll() is None}
            try:
                registered = {worker.pid for worker in model_workers(connection)}
            except redis.ConnectionError:
                registered = set()
            if running <= registered:
                return
            time.sleep(0.2)
        logs = "\n".join(path.read_text()[-2000:] for path in self.log_dir.glob("worker*.log"))
        raise RuntimeError(f"workers {sorted(running - registered)} never registered\n{logs}")

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
