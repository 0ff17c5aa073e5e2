"""Per-client limits for browser calls, by source address.

A short script must not be able to keep every slot busy (so that real customers hear "busy"):
each client address gets at most `concurrent_calls` calls at once and `attempts_per_minute`
call attempts in any 60 s; attempts with a bad or missing token count in a bucket of their own,
so junk cannot lock out callers who hold valid tokens.

The client's address is the TCP peer's, unless that peer is one of our own proxies
(`http.trusted_proxies`, e.g. the HAProxy in front): then it is read from X-Forwarded-For, every
line of it, walking from the right (the nearest hop) past our proxies' own entries to the first
address they did not add. Whatever a client wrote further left is never believed, and an entry
that is not an IP address ends the walk at the last hop we trust. IPv6 clients are keyed by
their /64 (one subscriber's prefix), so rotating through a prefix does not make new clients.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

MAX_CLIENTS = 10_000  # addresses tracked at once; the least recently seen go first
IPV6_PREFIX = 64

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(entries: Iterable[str]) -> list[Network]:
    """`http.trusted_proxies` (validated at config load, so a typo never reaches a call)."""
    return [ipaddress.ip_network(e, strict=False) for e in entries]


def _ip(text: str | None) -> Address | None:
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_key(ip: Address) -> str:
    """What the limits count by: the IPv4 address, or the IPv6 /64."""
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX}", strict=False))
    return str(ip)


def client_ip(peer: str | None, forwarded_for: Iterable[str], trusted: list[Network]) -> Address | None:
    """The client's address (see the module doc); None when even the peer's is unknown."""
    addr = _ip(peer)
    if addr is None or not trusted or not any(addr in n for n in trusted):
        return addr
    hops = [h.strip() for line in forwarded_for for h in line.split(",")]
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:
            return addr  # junk: stop at the last address a proxy of ours vouched for
        if not any(ip in n for n in trusted):
            return ip
        addr = ip
    return addr


def client_address(peer: str | None, forwarded_for: Iterable[str] | str | None, trusted: list[str] | list[Network]) -> str:
    """The key the limits use for this request's client ("unknown" without a peer address)."""
    lines = [forwarded_for] if isinstance(forwarded_for, str) else list(forwarded_for or [])
    nets = [n if not isinstance(n, str) else ipaddress.ip_network(n, strict=False) for n in trusted]
    ip = client_ip(peer, lines, nets)
    return client_key(ip) if ip is not None else "unknown"


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

    def _count(self, client: str, now: float, what: str) -> Limited | None:
        """One more attempt in the client's 60 s window (caller holds the lock)."""
        seen = self._attempts.pop(client, None) or collections.deque()
        self._attempts[client] = seen  # most recent last
        while seen and now - seen[0] >= self.window_s:
            seen.popleft()
        while len(self._attempts) > MAX_CLIENTS:
            self._attempts.popitem(last=False)
        if len(seen) >= self.attempts_per_minute:
            return Limited(f"more than {self.attempts_per_minute} {what} a minute from this address",
                           max(1, math.ceil(self.window_s - (now - seen[0]))))
        seen.append(now)
        return None

    def attempt(self, client: str, now: float | None = None) -> Limited | str:
        """Count a call attempt and hold one of the client's concurrent places for it, in one
        step (two offers at once from one client cannot both pass): a reservation id to hand to
        `ended` when the call ends or the attempt fails, or a refusal."""
        now = time.monotonic() if now is None else now
        with self._lock:
            limited = self._count(client, now, "call attempts")
            if limited is not None:
                return limited
            live = self._live.setdefault(client, set())
            if len(live) >= self.concurrent_calls:
                return Limited(f"{self.concurrent_calls} calls from this address are already up", 5)
            reservation = uuid.uuid4().hex
            live.add(reservation)
        return reservation

    def count(self, client: str, now: float | None = None) -> Limited | None:
        """Count an attempt in the rate window only, holding no place (the bad-token bucket)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return self._count(client, now, "refused attempts")

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
