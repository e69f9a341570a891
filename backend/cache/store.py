"""Byte stores behind the cache: Redis shared by every worker, or an in-process LRU bounded in bytes.

`ResilientStore` puts Redis first and falls back to the in-process LRU while Redis is unreachable,
so predictions keep working; it logs the outage once and the recovery once, not per request. What it
stored in-process during an outage it still finds, and writes back, when Redis returns without it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

import redis
import redis.lock

from backend.cache.connection import get_bytes, redis_client
from backend.cache.locks import renewed
from backend.images import redact_url

log = logging.getLogger(__name__)


class ByteStore(Protocol):
    """Keys to bytes with a time to live."""

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes, ttl_s: int) -> None: ...

    def delete(self, key: str) -> None: ...

    def lock(self, name: str, timeout_s: float) -> contextlib.AbstractContextManager[None]:
        """A lock that every process sharing this store respects."""

    def describe(self) -> dict[str, object]:
        """Which cache serves, for /health, /status and the start-up log."""

    def has_room(self, value_bytes: int) -> bool:
        """Whether a value of `value_bytes` fits below ROOM_FRACTION of the store's bound, so that storing it evicts
        nothing: work that may wait (encoding ahead of the annotator) asks first, to never push out what is in use."""

    def count_present(self, keys: list[str]) -> int:
        """How many of `keys` the store holds now, without reading their values."""


EXISTS_BATCH = 1000  # keys asked about in one Redis EXISTS: one round trip each, none holding Redis long
ROOM_FRACTION = 0.9  # of a store's bound that encoding ahead may fill; the rest is for what annotators open


class MemoryStore:
    """Thread-safe LRU of bytes, bounded by the total size of its values."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._mutex = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> bytes | None:
        entry = self.get_with_ttl(key)
        return entry[0] if entry is not None else None

    def get_with_ttl(self, key: str) -> tuple[bytes, float] | None:
        """The value and the seconds it has left to live."""
        with self._mutex:
            item = self._items.get(key)
            if item is None:
                return None
            value, expires_at = item
            left = expires_at - time.monotonic()
            if left < 0:
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return value, left

    def set(self, key: str, value: bytes, ttl_s: int) -> None:
        if len(value) > self.max_bytes:
            return
        with self._mutex:
            if key in self._items:
                self._drop(key)
            self._items[key] = (value, time.monotonic() + ttl_s)
            self._bytes += len(value)
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))

    def delete(self, key: str) -> None:
        with self._mutex:
            if key in self._items:
                self._drop(key)

    def _drop(self, key: str) -> None:
        value, _ = self._items.pop(key)
        self._bytes -= len(value)

    def describe(self) -> dict[str, object]:
        return {"cache": "in-process", "max_bytes": self.max_bytes, "used_bytes": self._bytes}

    def has_room(self, value_bytes: int) -> bool:
        return self._bytes + value_bytes <= ROOM_FRACTION * self.max_bytes

    def count_present(self, keys: list[str]) -> int:
        now = time.monotonic()
        with self._mutex:
            return sum(1 for key in keys if key in self._items and self._items[key][1] >= now)

    @contextlib.contextmanager
    def lock(self, name: str, timeout_s: float) -> Iterator[None]:
        # One process only: the in-process single-flight in EmbeddingCache already serialises it.
        yield


class ResilientStore:
    """Redis when reachable, the in-process LRU otherwise; never raises a Redis error to callers."""

    RETRY_AFTER_S = 5.0
    # A lock holder's lease, renewed while it lives: a worker killed mid-encode frees the image this soon.
    LOCK_LEASE_S = 5.0
    # /health asks Redis itself, at most once a PING_EVERY_S however often it is polled, and waits at most
    # PING_TIMEOUT_S for the answer: Label Studio gives /health 1 s.
    PING_EVERY_S = 1.0
    PING_TIMEOUT_S = 0.5

    def __init__(self, client: redis.Redis, fallback: MemoryStore, url: str) -> None:
        self.client = client
        self.fallback = fallback
        self.url = redact_url(url)
        self._down_since: float | None = None
        self._error = ""  # the type of the error that marked Redis down
        self._state_mutex = threading.Lock()
        self._ping_client = redis_client(url, socket_timeout_s=self.PING_TIMEOUT_S)
        self._pinged_at = -math.inf
        self._ping_mutex = threading.Lock()

    @classmethod
    def from_url(cls, url: str, fallback: MemoryStore) -> ResilientStore:
        return cls(redis_client(url), fallback, url)

    def describe(self) -> dict[str, object]:
        """Redis, and whether it answers now (`reachable_now`)."""
        reachable = self.reachable_now()
        return {
            "cache": "redis" if reachable else "in-process (Redis unreachable)",
            "redis_url": self.url,
            "redis_reachable": reachable,
            **({} if reachable else {"redis_error": self.redis_error}),
            "fallback_used_bytes": self.fallback.used_bytes,
        }

    def reachable_now(self) -> bool:
        """Whether Redis answers a ping: asked at most once a PING_EVERY_S (callers meanwhile get the last answer,
        or that of any command since) and waited for at most PING_TIMEOUT_S, so that frequent polls of /health
        say what is true now without loading Redis or waiting on a hung one. The answer also decides where the
        store's next command goes."""
        if time.monotonic() - self._pinged_at >= self.PING_EVERY_S and self._ping_mutex.acquire(blocking=False):
            try:
                self._pinged_at = time.monotonic()
                self._ping_client.ping()
                self._mark_up()
            except redis.RedisError as error:
                self._mark_down(error)
            finally:
                self._ping_mutex.release()
        return self.redis_up

    def has_room(self, value_bytes: int) -> bool:
        """Below ROOM_FRACTION of Redis's `maxmemory` (always, without one); while Redis is unreachable, the
        in-process fallback's answer."""
        if self._should_try_redis():
            try:
                memory = self.client.info("memory")
                self._mark_up()
            except redis.RedisError as error:
                self._mark_down(error)
            else:
                bound = int(memory.get("maxmemory", 0))
                return bound == 0 or int(memory["used_memory"]) + value_bytes <= ROOM_FRACTION * bound
        return self.fallback.has_room(value_bytes)

    def count_present(self, keys: list[str]) -> int:
        """Redis's count (one EXISTS per EXISTS_BATCH keys); while Redis is unreachable, the fallback's."""
        if self._should_try_redis():
            try:
                present = sum(
                    int(self.client.exists(*keys[first : first + EXISTS_BATCH]))
                    for first in range(0, len(keys), EXISTS_BATCH)
                )
                self._mark_up()
                return present
            except redis.RedisError as error:
                self._mark_down(error)
        return self.fallback.count_present(keys)

    @property
    def redis_up(self) -> bool:
        return self._down_since is None

    @property
    def redis_error(self) -> str:
        """The type of the error that last found Redis unreachable; "" while it answers."""
        return "" if self.redis_up else self._error

    def _should_try_redis(self) -> bool:
        down_since = self._down_since
        return down_since is None or time.monotonic() - down_since > self.RETRY_AFTER_S

    def _mark_down(self, error: Exception) -> None:
        with self._state_mutex:
            if self._down_since is None:
                log.warning(
                    "Redis at %s unreachable (%s); using the in-process cache until it is back", self.url, error
                )
            self._down_since = time.monotonic()
            self._error = type(error).__name__

    def _mark_up(self) -> None:
        if self._down_since is not None:
            with self._state_mutex:
                if self._down_since is not None:
                    log.warning("Redis at %s reachable again; the shared cache is back in use", self.url)
                self._down_since = None

    def get(self, key: str) -> bytes | None:
        if self._should_try_redis():
            try:
                value = get_bytes(self.client, key)
                self._mark_up()
                return value if value is not None else self._write_back(key)
            except redis.RedisError as error:
                self._mark_down(error)
        return self.fallback.get(key)

    def _write_back(self, key: str) -> bytes | None:
        """A value this process stored in-process while Redis was down (a Redis that came back empty after a
        restart has lost it), copied to Redis so no process computes it again. Redis's own value, written by
        another process meanwhile, is never overwritten."""
        entry = self.fallback.get_with_ttl(key)
        if entry is None:
            return None
        value, ttl_s = entry
        try:
            self.client.set(key, value, ex=max(int(ttl_s), 1), nx=True)
        except redis.RedisError as error:
            self._mark_down(error)
        return value

    def set(self, key: str, value: bytes, ttl_s: int) -> None:
        if self._should_try_redis():
            try:
                self.client.set(key, value, ex=ttl_s)
                self._mark_up()
                return
            except redis.RedisError as error:
                self._mark_down(error)
        self.fallback.set(key, value, ttl_s)

    def delete(self, key: str) -> None:
        self.fallback.delete(key)
        if self._should_try_redis():
            try:
                self.client.delete(key)
            except redis.RedisError as error:
                self._mark_down(error)

    @contextlib.contextmanager
    def lock(self, name: str, timeout_s: float) -> Iterator[None]:
        """Redis lock across processes, waiting up to `timeout_s`; without Redis, in-process exclusion is all
        there is. The lock is a short lease renewed while held, so a killed holder frees it within seconds."""
        redis_lock = None
        if self._should_try_redis():
            try:
                # Not thread-local: the renewing thread must see the token of the thread that acquired it.
                redis_lock = self.client.lock(
                    name, timeout=self.LOCK_LEASE_S, blocking_timeout=timeout_s, thread_local=False
                )
                if not redis_lock.acquire():
                    redis_lock = None
            except redis.RedisError as error:
                self._mark_down(error)
                redis_lock = None
        if redis_lock is None:
            yield
            return
        # A click holding the lock must not wait on a Redis gone silent when it leaves, and a late renewal of a
        # released lock only fails (its token no longer matches), so the renewal is not waited for.
        try:
            with renewed(redis_lock.reacquire, self.LOCK_LEASE_S / 3, name, wait=False):
                yield
        finally:
            with contextlib.suppress(redis.RedisError):
                redis_lock.release()


def make_store(redis_url: str, memory_bytes: int) -> ByteStore:
    """The configured store: Redis with an in-process fallback, or the in-process LRU alone."""
    memory = MemoryStore(memory_bytes)
    if not redis_url:
        log.info(
            "cache: in-process only (%d MiB), not shared with other processes: no Redis URL is set", memory_bytes >> 20
        )
        return memory
    store = ResilientStore.from_url(redis_url, memory)
    if store.reachable_now():
        log.info("cache: Redis at %s, shared by every process (in-process while it is unreachable)", store.url)
    return store
