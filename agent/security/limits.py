"""Per-client limits for browser calls, by source address.

A short script must not be able to keep every slot busy (so that real customers hear "busy"):
each client address gets at most `concurrent_calls` calls at once and `attempts_per_minute`
call attempts in any 60 s. The address is the TCP peer's, or, when that peer is one of our own
trusted proxies (`http.trusted_proxies`, e.g. the HAProxy in front), the last address in
X-Forwarded-For that is not itself a trusted proxy (what a client puts first in that header is
not to be believed).
"""

from __future__ import annotations

import collections
import ipaddress
import math
import threading
import time
from dataclasses import dataclass

MAX_CLIENTS = 10_000  # addresses tracked at once; the least recently seen go first


def _in(addr: str, nets) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in n for n in nets)


def client_address(peer: str | None, forwarded_for: str | None, trusted: list[str]) -> str:
    nets = [ipaddress.ip_network(n, strict=False) for n in trusted]
    addr = peer or "unknown"
    if not nets or not _in(addr, nets) or not forwarded_for:
        return addr
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):  # the nearest hop first: those our proxies added are believable
        if not _in(hop, nets):
            return hop
    return hops[0] if hops else addr


@dataclass(frozen=True)
class Limited:
    reason: str
    retry_after: int


class ClientLimits:
    def __init__(self, concurrent_calls: int, attempts_per_minute: int, window_s: float = 60.0):
        self.concurrent_calls = concurrent_calls
        self.attempts_per_minute = attempts_per_minute
        self.window_s = window_s
        self._attempts: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()
        self._live: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def attempt(self, client: str, now: float | None = None) -> Limited | None:
        """Count a call attempt; a refusal when the client is over a limit."""
        now = time.monotonic() if now is None else now
        with self._lock:
            seen = self._attempts.pop(client, None) or collections.deque()
            self._attempts[client] = seen  # most recent last
            while seen and now - seen[0] >= self.window_s:
                seen.popleft()
            while len(self._attempts) > MAX_CLIENTS:
                self._attempts.popitem(last=False)
            if len(seen) >= self.attempts_per_minute:
                return Limited(f"more than {self.attempts_per_minute} call attempts a minute from this address",
                               max(1, math.ceil(self.window_s - (now - seen[0]))))
            seen.append(now)
            if len(self._live.get(client, ())) >= self.concurrent_calls:
                return Limited(f"{self.concurrent_calls} calls from this address are already up", 5)
        return None

    def started(self, client: str, call_id: str) -> None:
        with self._lock:
            self._live.setdefault(client, set()).add(call_id)

    def ended(self, client: str, call_id: str) -> None:
        with self._lock:
            calls = self._live.get(client)
            if calls is not None:
                calls.discard(call_id)
                if not calls:
                    del self._live[client]


class MessageLimiter:
    """A call's data-channel messages: at most `max_bytes` each and `per_second` a second."""

    def __init__(self, max_bytes: int, per_second: int):
        self.max_bytes, self.per_second = max_bytes, per_second
        self._window_start = 0.0
        self._count = 0

    def admit(self, message, now: float | None = None) -> str | None:
        """None if the message may be handled, else why it is dropped ("too_large", "too_fast")."""
        size = len(message) if isinstance(message, (str, bytes, bytearray)) else 0
        if size > self.max_bytes:
            return "too_large"
        now = time.monotonic() if now is None else now
        if now - self._window_start >= 1.0:
            self._window_start, self._count = now, 0
        self._count += 1
        return "too_fast" if self._count > self.per_second else None
