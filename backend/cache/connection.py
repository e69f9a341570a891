"""The backend's one way to make a Redis client, with the time-outs every caller relies on."""

from __future__ import annotations

from typing import cast

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

# Every Redis command fails within SOCKET_TIMEOUT_S when Redis hangs (paused, partitioned) instead of blocking its
# thread without limit; blocking reads (XREAD, BLMOVE) wait at most BLOCKING_READ_S, so that their wait is never
# taken for a hung Redis.
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 1.0
BLOCKING_READ_S = 2


def redis_client(url: str, socket_timeout_s: float = SOCKET_TIMEOUT_S) -> redis.Redis:
    """The backend's one way to make a Redis client, whose commands fail after `socket_timeout_s` (and connecting
    after at most CONNECT_TIMEOUT_S). A command that timed out is not sent again (redis-py's default sends it ten
    more times, ten socket time-outs); one whose connection dropped is, once."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=min(CONNECT_TIMEOUT_S, socket_timeout_s),
        socket_timeout=socket_timeout_s,
        health_check_interval=30,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 1, supported_errors=(redis.ConnectionError,)),
    )


def get_bytes(client: redis.Redis, key: str) -> bytes | None:
    """GET from a client of `redis_client`."""
    # redis-py's stubs allow str, which only a client made with decode_responses=True returns; these never are.
    return cast(bytes | None, client.get(key))
