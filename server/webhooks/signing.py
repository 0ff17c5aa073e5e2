"""The webhook signature: what we send and how a receiver checks it.

`X-PersonaPlex-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.
The time is the attempt's, inside the MAC, so a receiver that refuses signatures older than its
replay window (`REPLAY_WINDOW_S`) cannot be fed an old capture, while a retry a day later still
verifies (it is signed anew). The body is the stored JSON byte for byte: a receiver must verify
the raw bytes it received, before parsing them. Several `v1=` entries may follow one `t=` (a
key rotation sends one per secret); any matching one is enough.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-PersonaPlex-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
EVENT_HEADER = "X-PersonaPlex-Event"
#: how far a signature's time may be from the receiver's clock (both ways), in seconds
REPLAY_WINDOW_S = 300


def mac(secret: bytes, body: bytes, t: int) -> str:
    return hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def signature(secret: bytes, body: bytes, t: int | None = None) -> str:
    """The header value for `body` signed now (or at `t`)."""
    t = int(time.time()) if t is None else int(t)
    return f"t={t},v1={mac(secret, body, t)}"


def verify(secret: bytes, header: str | None, body: bytes, now: float | None = None,
           tolerance_s: float = REPLAY_WINDOW_S) -> bool:
    """What a receiver does: the header parses, its time is within the window, and one of its
    `v1` MACs matches the raw body (compared in constant time)."""
    if not header:
        return False
    t: int | None = None
    macs: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            t = int(value)
        elif key == "v1":
            macs.append(value)
    if t is None or not macs:
        return False
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        return False
    want = mac(secret, body, t)
    return any(hmac.compare_digest(want, m) for m in macs)
