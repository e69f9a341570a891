"""Locks that one holder keeps against every other thread, process and host: a `flock` for this host,
a Redis lease (when REDIS_URL is set) for all hosts. Both free themselves if their holder dies: the
kernel drops the flock, and the lease is only renewed while its holder lives (`renewed`, which the queue
worker also uses for its job leases)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import redis
from redis.exceptions import LockError

from backend.cache.connection import redis_client
from backend.errors import LockBusy

log = logging.getLogger(__name__)


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[None]:
    """An exclusive lock between threads and processes of one host; `LockBusy` if not blocking and taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each call opens its own file description, so two threads of one process exclude each other too.
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError as error:
            raise LockBusy(str(path)) from error
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def renewed(renew: Callable[[], object], every_s: float, name: str, wait: bool = True) -> Iterator[None]:
    """Calls `renew` every `every_s` seconds from a thread of its own while the block runs, so that a lease
    outlasts its holder's long work (which may keep the holder's thread busy) but not its holder. A failed
    renewal is logged and the next one tried: Redis may be back by then. Leaving the block waits for a renewal
    in flight unless `wait` is false, for holders that must not wait on a Redis gone silent and whose late
    renewal is harmless."""
    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(every_s):
            try:
                renew()
            except (LockError, redis.RedisError) as error:
                log.warning("could not renew %s: %s", name, error)

    renewer = threading.Thread(target=keep_alive, name=f"{name}-renewal", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        if wait:
            renewer.join()


@contextlib.contextmanager
def redis_lease(name: str, url: str, ttl_s: float) -> Iterator[None]:
    """Held while the block runs, kept alive every ttl/3 so a killed holder frees it within `ttl_s`;
    `LockBusy` at once if another holder has it. Without Redis only the caller's file lock guards."""
    client = redis_client(url)
    # Not thread-local: the keep-alive thread extends the lock this thread took.
    lock = client.lock(name, timeout=ttl_s, blocking=False, thread_local=False)
    try:
        acquired = lock.acquire()
    except redis.RedisError as error:
        log.warning("Redis unreachable (%s): only this host's file lock guards %s", error, name)
        yield
        return
    if not acquired:
        raise LockBusy(name)
    try:
        with renewed(lambda: lock.extend(ttl_s, replace_ttl=True), ttl_s / 3, name):
            yield
    finally:
        with contextlib.suppress(LockError, redis.RedisError):
            lock.release()


@contextlib.contextmanager
def exclusive(lock_file: Path, redis_name: str, redis_url: str, ttl_s: float) -> Iterator[None]:
    """Raises `LockBusy` at once if another holder has it, on this host or (with Redis) any other."""
    with file_lock(lock_file, blocking=False):
        if not redis_url:
            yield
            return
        with redis_lease(redis_name, redis_url, ttl_s):
            yield
