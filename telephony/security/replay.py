"""Where used single-use credentials are remembered (call-token ids, `jti`, and Twilio stream
grants), so that each is accepted once. The runtime makes one store for every transport.

`claim(jti, expires_at)` is an atomic set-if-absent: True the first time, False for a replay.
In one process a dict does (`LocalReplayStore`); a farm of agents behind one load balancer
shares Redis (`webrtc.tokens.replay_store: redis://HOST:PORT/DB`, `telephony.security.replay_redis`),
or a token could be used once on each agent. A store that cannot answer raises
`ReplayStoreUnavailable`: the call is refused (fail closed), never admitted unchecked.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class ReplayStoreUnavailable(Exception):
    """The shared store did not answer: whether the token was used before is unknown."""


class ReplayStore(Protocol):
    def claim(self, jti: str, expires_at: float) -> bool:
        """Remember `jti` until `expires_at` (epoch seconds); False when it was already there."""
        ...

    def close(self) -> None: ...


class LocalReplayStore:
    """This process's memory: right for one agent, once per agent in a farm."""

    def __init__(self) -> None:
        self._used: dict[str, float] = {}
        self._lock = threading.Lock()

    def claim(self, jti: str, expires_at: float) -> bool:
        now = time.time()
        with self._lock:
            self._used = {k: v for k, v in self._used.items() if v > now}  # forget expired ones
            if jti in self._used:
                return False
            self._used[jti] = expires_at
            return True

    def close(self) -> None:
        pass


def make_replay_store(url: str | None) -> ReplayStore:
    """The store `webrtc.tokens.replay_store` names (None: this process)."""
    if url is None:
        return LocalReplayStore()
    from telephony.security.replay_redis import RedisReplayStore

    return RedisReplayStore(url)
