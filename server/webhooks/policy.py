"""What an attempt's result means for its event: delivered, try again later, or give up.

A 2xx is delivered. A 4xx says the receiver will never take this event as it is (a bad URL, a
rejected signature, a schema it refuses): retrying would only repeat it, so it is dead-lettered
(kept, counted) for an operator, except 408 (Request Timeout) and 429 (Too Many Requests),
which say "later". A redirect is dead-lettered too: we never follow one (the body carries
personal data; a receiver that moved gets its URL changed in the config). 5xx, timeouts and
connection failures are the receiver being down or slow: retried, with exponential backoff and
jitter so that many agents coming back at once do not hit it in step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Outcome:
    action: Literal["delivered", "retry", "dead"]
    reason: str = ""  # the failure's label (personaplex_webhooks_failed_total{reason}); "" when delivered
    retry_after_s: float | None = None  # what the receiver asked for (Retry-After), if anything


def classify(status: int | None, failure: str | None = None, retry_after: str | None = None) -> Outcome:
    """`status`: the HTTP status, or None when there was none (`failure`: "timeout", "connect")."""
    if status is None:
        return Outcome("retry", failure or "connect")
    if 200 <= status < 300:
        return Outcome("delivered")
    if status in (408, 429) or status >= 500:
        reason = f"status_{status}" if status in (408, 429) else "status_5xx"
        return Outcome("retry", reason, _seconds(retry_after))
    if 300 <= status < 400:
        return Outcome("dead", "redirect")
    return Outcome("dead", "status_4xx")


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored: backoff applies)."""
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def backoff(attempts: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Seconds before the next attempt after `attempts` failed ones: base, 2 base, 4 base ... up to
    `max_s`, each drawn between half and all of it ("equal jitter": never a burst at zero)."""
    delay = min(max_s, base_s * 2 ** max(0, attempts - 1))
    return delay / 2 + (rng or random).uniform(0, delay / 2)
