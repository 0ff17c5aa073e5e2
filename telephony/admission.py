"""One place that says yes or no to a call, whatever transport brought it.

Draining, routing (with the unknown-number policy), capacity and the refusal metrics are the
same for SIP, WebRTC and the carriers' media streams. The answer is an `AdmittedCall` (a slot is
held; the call has not started), or a typed `Refusal` that each transport maps to its own wire
with one small table (`SIP_STATUS`, `HTTP_STATUS`, `WS_CLOSE`). The transport's leg starts the
admitted call once it listens to the call's events (`CallLeg.start`), so no transport can miss
one. `availability()` answers "could a call be taken now?" without taking one: SIP's OPTIONS,
readiness and Twilio's webhook ask the same question an INVITE does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import structlog

from agent.metrics import Metrics
from agent.personas.schema import Persona
from agent.calls.session import CallSession
from agent.errors import CallRefused
from telephony.call_queue import CallQueue, QueueSettings, Ticket

if TYPE_CHECKING:  # the scheduler imports torch; admission's callers (and unit tests) need not
    from agent.calls.scheduler import Scheduler

log = structlog.get_logger(__name__)


class RefusalKind(str, enum.Enum):
    FORBIDDEN = "forbidden"  # the caller may not call (source address, persona not on this line)
    UNAUTHORIZED = "unauthorized"  # missing or wrong credentials (stream token, grant, signature)
    NOT_FOUND = "not_found"  # no persona answers that number
    BUSY = "busy"  # every call slot is taken
    DRAINING = "draining"  # this agent is shutting down: another one should take it
    UNAVAILABLE = "unavailable"  # the engine is not running
    LIMITED = "limited"  # this client is over its limits

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Refusal:
    kind: RefusalKind
    reason: str  # for logs and, where the wire allows, the caller
    retry_after: int | None = None  # seconds, when trying again later makes sense


@dataclass(frozen=True)
class CallRequest:
    """What a transport knows of a call when it asks to take it."""

    endpoint: str  # "sip", "webrtc", "twilio", "telnyx"
    dialled: str | None  # number, URI or persona id; None/empty: the default persona (policy permitting)
    caller: str | None = None
    call_id: str | None = None
    variables: dict[str, str] = field(default_factory=dict)  # per-call context the transport carries
    persona: Persona | None = None  # a persona given outright (the playground): no routing
    can_wait: bool = False  # the transport can hold the caller in the queue (plays hold audio)


#: SIP final responses per refusal; BUSY follows `sip.busy_code` (486 or 503).
SIP_STATUS = {RefusalKind.FORBIDDEN: (403, "Forbidden"), RefusalKind.UNAUTHORIZED: (403, "Forbidden"),
              RefusalKind.NOT_FOUND: (404, "Not Found"),
              RefusalKind.BUSY: (486, "Busy Here"), RefusalKind.DRAINING: (503, "Service Unavailable"),
              RefusalKind.UNAVAILABLE: (503, "Service Unavailable"),
              RefusalKind.LIMITED: (503, "Service Unavailable")}
HTTP_STATUS = {RefusalKind.FORBIDDEN: 403, RefusalKind.UNAUTHORIZED: 401, RefusalKind.NOT_FOUND: 404, RefusalKind.BUSY: 503,
               RefusalKind.DRAINING: 503, RefusalKind.UNAVAILABLE: 503, RefusalKind.LIMITED: 429}
#: WebSocket close codes (RFC 6455 section 7.4.1): 1008 policy violation (this call will never
#: be taken here), 1013 try again later (busy, draining).
WS_CLOSE = {RefusalKind.FORBIDDEN: 1008, RefusalKind.UNAUTHORIZED: 1008, RefusalKind.NOT_FOUND: 1008, RefusalKind.BUSY: 1013,
            RefusalKind.DRAINING: 1013, RefusalKind.UNAVAILABLE: 1013, RefusalKind.LIMITED: 1013}


class AdmittedCall:
    """A call that holds a slot and has not started: its transport's leg starts it once it
    listens to the call's events (`start`, once; later calls do nothing)."""

    def __init__(self, session: CallSession, request: CallRequest, start: Callable[[CallSession, CallRequest], None]):
        self.session = session
        self.request = request
        self._start: Callable[[CallSession, CallRequest], None] | None = start

    def start(self) -> None:
        start, self._start = self._start, None
        if start is not None:
            start(self.session, self.request)

    @property
    def started(self) -> bool:
        return self._start is None


class Admission:
    def __init__(self, scheduler: Scheduler, route: Callable[[str | None], Persona | None], metrics: Metrics,
                 retry_after_s: int, start: Callable[[CallSession, CallRequest], None] | None = None,
                 queue: QueueSettings | None = None):
        """`route(dialled)` applies the unknown-number policy (None: refuse); `start(session,
        request)` gives an admitted call its prompt (default: its persona's, at once); `queue`:
        hold callers whose transport can wait while every slot is busy (default: none)."""
        self.scheduler = scheduler
        self.route = route
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self._start = start or (lambda sess, req: scheduler.start_call(sess))
        self.queue = CallQueue(queue or QueueSettings(), metrics, self._take,
                               lambda ep, kind, reason, retry: self.refuse(ep, RefusalKind(kind), reason, retry),
                               self._slot_unavailable, retry_after_s)

    @property
    def capacity(self) -> int:
        """Calls this agent runs at once (its batch)."""
        return self.scheduler.config.max_calls

    def _slot_unavailable(self) -> str | None:
        """Why no slot could be taken now, ignoring the queue (a RefusalKind value), or None."""
        if self.scheduler.draining:
            return RefusalKind.DRAINING.value
        if not self.scheduler.running:
            return RefusalKind.UNAVAILABLE.value
        if self.scheduler.capacity_left <= 0:
            return RefusalKind.BUSY.value
        return None

    def availability(self) -> RefusalKind | None:
        """Why no new call could be taken now (draining, not running, every slot busy and the
        queue full or off), or None: a caller who would wait in the queue counts as taken
        (readiness, OPTIONS). Nothing is held and nothing is counted."""
        why = self._slot_unavailable()
        if why == RefusalKind.BUSY.value and self.queue.enabled and not self.queue.full:
            return None
        return RefusalKind(why) if why is not None else None

    def refuse(self, endpoint: str, kind: RefusalKind, reason: str, retry_after: int | None = None) -> Refusal:
        """A refusal, counted (`personaplex_calls_total{outcome="refused_<kind>"}`)."""
        self.metrics.calls_total.labels(endpoint, f"refused_{kind.value}").inc()
        log.info("call_refused", endpoint=endpoint, refusal=kind.value, reason=reason)
        return Refusal(kind, reason, retry_after)

    def check(self, endpoint: str, dialled: str | None, persona: Persona | None = None,
              can_wait: bool = False) -> Persona | Refusal:
        """Would a call to `dialled` (or with this `persona`) be taken now? (No slot is held;
        nothing is counted unless refused.) For transports that must answer before the call
        arrives (Twilio's webhook); `can_wait`: a caller who would wait in the queue (it has
        room) counts as taken, as in `availability`."""
        if self.scheduler.draining:
            return self.refuse(endpoint, RefusalKind.DRAINING, "the agent is shutting down", self.retry_after_s)
        persona = persona or self.route(dialled)
        if persona is None:
            return self.refuse(endpoint, RefusalKind.NOT_FOUND, f"no persona answers {dialled!r}")
        if persona.direction == "outbound":
            return self.refuse(endpoint, RefusalKind.NOT_FOUND, f"persona {persona.id} only places calls")
        # busy, or others wait already (a newcomer never overtakes them)
        busy = self._slot_unavailable() == RefusalKind.BUSY.value or self.queue.depth > 0
        if busy and not (can_wait and self.queue.enabled and not self.queue.full):
            return self.refuse(endpoint, RefusalKind.BUSY, "every call slot is busy", self.retry_after_s)
        return persona

    def admit(self, req: CallRequest) -> AdmittedCall | Ticket | Refusal:
        """A slot, a place in the queue (`req.can_wait`, every slot busy or others waiting
        already: first come, first served), or a refusal."""
        if self.queue.depth and not self.scheduler.draining:
            # others wait for the next free slot: a newcomer never overtakes them
            if not req.can_wait:
                return self.refuse(req.endpoint, RefusalKind.BUSY, "every call slot is busy", self.retry_after_s)
            return self._enqueue(req)
        if req.can_wait and self.queue.enabled and self._slot_unavailable() == RefusalKind.BUSY.value:
            return self._enqueue(req)
        checked = self.check(req.endpoint, req.dialled, req.persona)
        if isinstance(checked, Refusal):
            return checked
        taken = self._take(req, checked)
        if taken is None:
            return self.refuse(req.endpoint, RefusalKind.BUSY, "every call slot is busy", self.retry_after_s)
        return taken

    def admit_outbound(self, req: CallRequest) -> AdmittedCall | Refusal:
        """A slot for a call the agent places (`req.persona` given; the caller's limits are the
        outbound API's): no routing, no queue, and no inbound-only persona."""
        assert req.persona is not None
        if self.scheduler.draining:
            return self.refuse(req.endpoint, RefusalKind.DRAINING, "the agent is shutting down", self.retry_after_s)
        if req.persona.direction == "inbound":
            return self.refuse(req.endpoint, RefusalKind.NOT_FOUND, f"persona {req.persona.id} only answers calls")
        taken = self._take(req, req.persona)
        if taken is None:
            return self.refuse(req.endpoint, RefusalKind.BUSY, "every call slot is busy", self.retry_after_s)
        return taken

    def _enqueue(self, req: CallRequest) -> Ticket | Refusal:
        persona = req.persona or self.route(req.dialled)
        if persona is None or persona.direction == "outbound":
            return self.refuse(req.endpoint, RefusalKind.NOT_FOUND, f"no persona answers {req.dialled!r}")
        ticket = self.queue.join(req, persona)
        if ticket is None:
            return self.refuse(req.endpoint, RefusalKind.BUSY, "every call slot is busy and the queue is full",
                               self.retry_after_s)
        log.info("call_queued", endpoint=req.endpoint, position=ticket.position)
        return ticket

    def _take(self, req: CallRequest, persona: Persona) -> AdmittedCall | Refusal | None:
        """A slot now; None when every slot is busy (not counted: the queue polls)."""
        try:
            sess = self.scheduler.admit(persona, req.dialled or persona.id, req.endpoint, call_id=req.call_id,
                                        caller=req.caller)
        except CallRefused as exc:
            if exc.code == RefusalKind.BUSY.value:
                return None
            return self.refuse(req.endpoint, RefusalKind(exc.code), exc.reason, exc.retry_after)
        return AdmittedCall(sess, req, self._start)
