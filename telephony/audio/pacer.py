"""The one real-time clock that paces agent audio out of asyncio transports (carrier streams,
the WebRTC track): packet n leaves at t0 + (n - lead) * period.

Why one: both need the same two rules, and two copies drift apart. Packets are due on an
absolute schedule (no accumulated sleep error), `lead` packets ahead of real time so the far
end's playout never starves on jitter; and when the event loop stalled so long that packets are
over `max_lag_s` overdue, the schedule is re-anchored to now instead of bursting the backlog (a
burst would only be queued at the far end as latency). Packet numbers keep counting through a
re-anchor, so timestamps derived from them (RTP pts, marks every N packets) stay continuous.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable


class Pacer:
    def __init__(self, period_s: float, *, lead: int = 0, max_lag_s: float = 0.2,
                 clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        """`clock`: monotonic seconds (default: the running loop's clock); `sleep`: how to wait."""
        self.period_s, self.lead, self.max_lag_s = period_s, lead, max_lag_s
        self._clock = clock
        self._sleep = sleep
        self._t0: float | None = None
        self.sent = 0  # packets released so far (the next packet's number)
        self.reanchored = 0  # stalls recovered from

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def wait(self) -> int:
        """Wait until the next packet is due; returns its number (0, 1, ...)."""
        now = self._now()
        if self._t0 is None:
            self._t0 = now
        n = self.sent
        due = self._t0 + (n - self.lead) * self.period_s
        if due - now > 0:
            await self._sleep(due - now)
        elif now - due > self.max_lag_s:  # the loop stalled: this packet is due now, the rest follow
            self._t0 = now - (n - self.lead) * self.period_s
            self.reanchored += 1
        self.sent = n + 1
        return n

    def hold(self) -> None:
        """The packet just waited for did not go (the far end is too far ahead): it is due again
        at the next `wait`, at once, re-anchored if it has been held past `max_lag_s`."""
        self.sent -= 1
