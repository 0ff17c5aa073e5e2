"""When a campaign may dial: the calling window (local time), durations as people write them
(`10m`), and the retry rule for each outcome. Pure arithmetic on datetimes, so it is tested
without waiting."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, time, timedelta

from agent.errors import BadInput

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

#: outcomes of an answered-or-not call the campaign may dial again (after --retry-after)
RETRYABLE = frozenset({"busy", "no_answer", "machine", "error"})
#: call states of the ops API after which a call is over (`ended`: it was answered)
FINAL_STATES = frozenset({"busy", "no_answer", "declined", "failed", "ended"})


def parse_duration(text: str) -> float:
    """Seconds in `90`, `30s`, `10m`, `1.5h`, `1d` (no unit: seconds)."""
    m = _DURATION.match(str(text))
    if not m:
        raise BadInput(f"{text!r} is not a duration (examples: 30s, 10m, 2h)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


@dataclass(frozen=True)
class Window:
    """Local hours in which calls may start, `start` inclusive, `end` exclusive. An `end` before
    `start` spans midnight (`20:00-02:00`); equal ends mean all day. A call in progress at the
    end runs on: the window bounds when calls start, not how long they last."""

    start: time
    end: time

    @classmethod
    def parse(cls, text: str | None) -> "Window":
        if not text:
            return cls(time(0, 0), time(0, 0))
        m = re.match(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$", text)
        if not m:
            raise BadInput(f"--window {text!r}: write it as HH:MM-HH:MM in local time, e.g. 09:00-18:00")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h2 == 24 and m2 == 0:
            h2 = 0
        if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
            raise BadInput(f"--window {text!r}: hours 00-23 (or 24:00 as the end), minutes 00-59")
        return cls(time(h1, m1), time(h2, m2))

    @property
    def all_day(self) -> bool:
        return self.start == self.end

    def contains(self, now: datetime) -> bool:
        t = now.time().replace(tzinfo=None)
        if self.all_day:
            return True
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end  # spans midnight

    def next_open(self, now: datetime) -> datetime:
        """`now` when inside the window, else the next moment it opens (same tzinfo as `now`).
        Wall-clock arithmetic: on a DST change day the opening is the local time on the clock."""
        if self.contains(now):
            return now
        opening = now.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        return opening if opening > now else opening + timedelta(days=1)


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` more attempts after the first for a retryable outcome, each `retry_after` s
    after the previous attempt ended. Capacity refusals (503) are not attempts: they wait
    `capacity_backoff` s, doubling to `capacity_backoff_max`, and never exhaust a row."""

    retries: int = 2
    retry_after: float = 600.0
    capacity_backoff: float = 2.0
    capacity_backoff_max: float = 30.0

    @property
    def max_attempts(self) -> int:
        return 1 + self.retries

    def next_attempt(self, outcome: str, attempts: int, ended_at: float) -> float | None:
        """When to dial again after an attempt that ended `ended_at` with `outcome`, the
        `attempts`-th; None when the row is done (a final outcome, or no retries left)."""
        if outcome not in RETRYABLE or attempts >= self.max_attempts:
            return None
        return ended_at + self.retry_after

    def capacity_wait(self, refusals_in_a_row: int) -> float:
        """Seconds to wait after the n-th capacity refusal in a row (n >= 1)."""
        return min(self.capacity_backoff * 2 ** max(0, refusals_in_a_row - 1), self.capacity_backoff_max)
