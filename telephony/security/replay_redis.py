"""Used call-token ids (`jti`) kept in Redis, shared by every agent of a farm.

Why: behind one load balancer, each agent remembering the tokens it took itself
(`LocalReplayStore`) would let a token call once on each agent: a replay goes to another agent
and is accepted there. One Redis that every agent asks makes single use hold for the farm.

How: `claim` is one atomic `SET personaplex:jti:<jti> 1 NX EX <ttl>` (ttl: until the token's
expiry, at least 1 s; Redis forgets it after that, when the token is refused as expired anyway).
Set: the first use. Not set: a replay.

Fail closed: when Redis does not answer (refused, timed out, wrong password, read-only replica,
out of memory...) `claim` raises `ReplayStoreUnavailable` and the call is refused: whether the
token was used before is unknown, and admitting it unchecked would let replays through. Each call
is bounded (0.5 s to connect, 0.5 s to answer, no retries), because the agent asks from its
request handler. Nothing is kept between calls but redis-py's connection pool, which reconnects by
itself once Redis is back: the next call works again, no restart needed. The URL's password is
never part of a message or log line.
"""

from __future__ import annotations

import math
import threading
import time

import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

from telephony.security.replay import ReplayStoreUnavailable

log = structlog.get_logger(__name__)

KEY_PREFIX = "personaplex:jti:"
TIMEOUT_S = 0.5  # connect, and each answer: a claim takes at most about this long (twice when connecting)


class RedisReplayStore:
    """`ReplayStore` on the Redis at `url` (redis://[:PASSWORD@]HOST:PORT/DB, rediss://, unix://)."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S, key_prefix: str = KEY_PREFIX):
        try:
            self._client = redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0), retry_on_timeout=False,  # bounded: one try per claim
                health_check_interval=0, single_connection_client=False)
        except ValueError as exc:  # a malformed URL; its text may hold the URL, so not repeated
            raise ValueError(f"webrtc.tokens.replay_store is not a valid Redis URL ({type(exc).__name__})") from None
        kw = self._client.connection_pool.connection_kwargs
        self._password = kw.get("password")
        self.where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}/{kw.get('db', 0)}"  # never the password
        self._prefix = key_prefix
        self._lock = threading.Lock()
        self._down = False  # the last claim failed: log once when it goes down, once when back

    def claim(self, jti: str, expires_at: float) -> bool:
        ttl = max(1, math.ceil(expires_at - time.time()))
        try:
            fresh = self._client.set(self._prefix + jti, 1, nx=True, ex=ttl)
        except (redis.RedisError, OSError) as exc:
            reason = self._reason(exc)
            self._state(down=True, reason=reason)
            raise ReplayStoreUnavailable(f"replay store {self.where}: {reason}") from None
        self._state(down=False)
        return bool(fresh)

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()

    def _reason(self, exc: BaseException) -> str:
        """A short, secret-free line: the error's kind and redis-py's text (host:port at most), with
        the password taken out should a message ever carry it."""
        text = " ".join(str(exc).split())[:160]
        if self._password:
            text = text.replace(str(self._password), "***")
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    def _state(self, down: bool, reason: str | None = None) -> None:
        with self._lock:
            changed, self._down = self._down != down, down
        if changed and down:
            log.warning("replay_store_unavailable", store=self.where, reason=reason,
                        effect="browser calls with tokens are refused until it answers")
        elif changed:
            log.info("replay_store_available", store=self.where)
