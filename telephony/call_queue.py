"""Callers on hold while every slot is busy, answered first come, first served.

A transport that can keep a caller on the line (SIP) asks admission with `can_wait`; when every
slot is busy and the queue has room, it gets a `Ticket` instead of a refusal. The transport
plays hold audio and polls the ticket from its own thread (`Ticket.poll`, cheap): the ticket at
the head of the queue takes the next free slot and becomes an `AdmittedCall`, started like any
other call; a ticket over `max_wait_s`, or any ticket once the agent drains, becomes a refusal.
Polling keeps the queue free of cross-thread callbacks: the transport's own thread owns its
call, and a slot that frees is taken within one poll (the SIP thread polls every few ms).

Priorities could be added by keeping one deque per priority class and taking the head of the
highest non-empty class (`_head`); FIFO holds within a class.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from agent.metrics import Metrics

if TYPE_CHECKING:  # admission imports this module
    from telephony.admission import AdmittedCall, CallRequest, Refusal


@dataclass(frozen=True)
class QueueSettings:
    max_waiting: int = 0  # 0: no queue (busy callers are refused)
    max_wait_s: float = 120.0


@dataclass(frozen=True)
class Waiting:
    """One caller on hold as others may see it (a copy: tickets stay the transport's)."""

    position: int  # 1: the next to be answered
    waited_s: float
    endpoint: str
    caller: str | None
    dialled: str | None
    persona: str | None


class Ticket:
    """One caller on hold. Only the transport's thread that holds it calls `poll` and `leave`."""

    def __init__(self, queue: "CallQueue", request: "CallRequest", persona):
        self.queue = queue
        self.request = request
        self.persona = persona
        self.joined = time.monotonic()
        self.done = False

    @property
    def position(self) -> int:
        """1 for the next caller to be answered; 0 once out of the queue."""
        return self.queue.position(self)

    @property
    def waited_s(self) -> float:
        return time.monotonic() - self.joined

    def poll(self) -> "AdmittedCall | Refusal | None":
        """The call once a slot is free and this ticket is next; a refusal once it waited too
        long or the agent drains; None: keep holding."""
        return self.queue.poll(self)

    def leave(self) -> None:
        """The caller hung up while waiting: out at once, counted as abandoned."""
        self.queue.leave(self)


class CallQueue:
    def __init__(self, settings: QueueSettings, metrics: Metrics,
                 take: Callable[["CallRequest", object], "AdmittedCall | Refusal | None"],
                 refuse: Callable[[str, str, str, int | None], "Refusal"], can_take: Callable[[], str | None],
                 retry_after_s: int):
        """`take(request, persona)` takes a slot now (None: it went to someone else); `refuse(endpoint, kind, reason, retry)`
        makes a counted refusal; `can_take()` says why no slot could be taken now (a
        RefusalKind value) or None."""
        self.settings = settings
        self.metrics = metrics
        self._take = take
        self._refuse = refuse
        self._can_take = can_take
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._waiting: collections.deque[Ticket] = collections.deque()

    @property
    def enabled(self) -> bool:
        return self.settings.max_waiting > 0

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def full(self) -> bool:
        return self.depth >= self.settings.max_waiting

    def waiting(self) -> list[Waiting]:
        """Who is on hold now, head first: what a supervisor's view of the queue shows."""
        with self._lock:
            tickets = list(self._waiting)
        return [Waiting(position=i + 1, waited_s=round(t.waited_s, 1), endpoint=t.request.endpoint,
                        caller=t.request.caller, dialled=t.request.dialled,
                        persona=getattr(t.persona, "id", None)) for i, t in enumerate(tickets)]

    def position(self, ticket: Ticket) -> int:
        with self._lock:
            try:
                return self._waiting.index(ticket) + 1
            except ValueError:
                return 0

    def join(self, request: "CallRequest", persona) -> Ticket | None:
        """A ticket at the end of the queue, or None when the queue is full (or off)."""
        with self._lock:
            if len(self._waiting) >= self.settings.max_waiting:
                return None
            ticket = Ticket(self, request, persona)
            self._waiting.append(ticket)
            self.metrics.queue_depth.set(len(self._waiting))
        return ticket

    def _out(self, ticket: Ticket, outcome: str) -> None:
        """Remove (under the lock) and count one way out of the queue."""
        try:
            self._waiting.remove(ticket)
        except ValueError:
            pass
        ticket.done = True
        self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.queue_wait_seconds.labels(outcome).observe(ticket.waited_s)
        self.metrics.queue_outcomes.labels(ticket.request.endpoint, outcome).inc()

    def poll(self, ticket: Ticket) -> "AdmittedCall | Refusal | None":
        if ticket.done:
            return None
        with self._lock:
            why = self._can_take()
            if why == "draining" or why == "unavailable":
                self._out(ticket, "refused")
                reason = "the agent is shutting down" if why == "draining" else "the engine is not running"
                return self._refuse(ticket.request.endpoint, why, reason, self.retry_after_s)
            if ticket.waited_s > self.settings.max_wait_s:
                self._out(ticket, "timed_out")
                return self._refuse(ticket.request.endpoint, "busy",
                                    f"no slot came within queue.max_wait_s ({self.settings.max_wait_s:g} s)",
                                    self.retry_after_s)
            if why is not None or not self._waiting or self._waiting[0] is not ticket:
                return None
            waited = ticket.waited_s
            taken = self._take(ticket.request, ticket.persona)
            if taken is None:  # the slot went between check and take: wait for the next
                return None
            if not hasattr(taken, "session"):  # refused for another reason
                self._out(ticket, "refused")
                return taken
            self._out(ticket, "answered")
        taken.session.queue_wait_s = round(waited, 3)
        return taken

    def leave(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.done:
                return
            self._out(ticket, "abandoned")
