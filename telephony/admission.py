"""One place that says yes or no to a call, whatever transport brought it.

Draining, routing (with the unknown-number policy), capacity and the refusal metrics are the
same for SIP, WebRTC and the carriers' media streams. The answer is a session, or a typed
`Refusal` that each transport maps to its own wire with one small table (`SIP_STATUS`,
`HTTP_STATUS`, `WS_CLOSE`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import structlog

from agent.metrics import Metrics
from agent.personas.schema import Persona
from agent.scheduler import CallRefused, Scheduler
from agent.session import CallSession

log = structlog.get_logger(__name__)


class RefusalKind(str, enum.Enum):
    FORBIDDEN = "forbidden"  # the caller may not call (source address, credentials)
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


#: SIP final responses per refusal; BUSY follows `sip.busy_code` (486 or 503).
SIP_STATUS = {RefusalKind.FORBIDDEN: (403, "Forbidden"), RefusalKind.NOT_FOUND: (404, "Not Found"),
              RefusalKind.BUSY: (486, "Busy Here"), RefusalKind.DRAINING: (503, "Service Unavailable"),
              RefusalKind.UNAVAILABLE: (503, "Service Unavailable"),
              RefusalKind.LIMITED: (503, "Service Unavailable")}
HTTP_STATUS = {RefusalKind.FORBIDDEN: 403, RefusalKind.NOT_FOUND: 404, RefusalKind.BUSY: 503,
               RefusalKind.DRAINING: 503, RefusalKind.UNAVAILABLE: 503, RefusalKind.LIMITED: 429}
#: WebSocket close codes (RFC 6455 section 7.4.1): 1008 policy violation (this call will never
#: be taken here), 1013 try again later (busy, draining).
WS_CLOSE = {RefusalKind.FORBIDDEN: 1008, RefusalKind.NOT_FOUND: 1008, RefusalKind.BUSY: 1013,
            RefusalKind.DRAINING: 1013, RefusalKind.UNAVAILABLE: 1013, RefusalKind.LIMITED: 1013}


class Admission:
    def __init__(self, scheduler: Scheduler, route: Callable[[str | None], Persona | None], metrics: Metrics,
                 retry_after_s: int, start: Callable[[CallSession, CallRequest], None] | None = None):
        """`route(dialled)` applies the unknown-number policy (None: refuse); `start(session,
        request)` gives an admitted call its prompt (default: its persona's, at once)."""
        self.scheduler = scheduler
        self.route = route
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self._start = start or (lambda sess, req: scheduler.start_call(sess))

    def refuse(self, endpoint: str, kind: RefusalKind, reason: str, retry_after: int | None = None) -> Refusal:
        """A refusal, counted (`personaplex_calls_total{outcome="refused_<kind>"}`)."""
        self.metrics.calls_total.labels(endpoint, f"refused_{kind.value}").inc()
        log.info("call_refused", endpoint=endpoint, refusal=kind.value, reason=reason)
        return Refusal(kind, reason, retry_after)

    def check(self, endpoint: str, dialled: str | None, persona: Persona | None = None) -> Persona | Refusal:
        """Would a call to `dialled` (or with this `persona`) be taken now? (No slot is held;
        nothing is counted unless refused.) For transports that must answer before the call
        arrives (Twilio's webhook)."""
        if self.scheduler.draining:
            return self.refuse(endpoint, RefusalKind.DRAINING, "the agent is shutting down", self.retry_after_s)
        persona = persona or self.route(dialled)
        if persona is None:
            return self.refuse(endpoint, RefusalKind.NOT_FOUND, f"no persona answers {dialled!r}")
        if self.scheduler.capacity_left <= 0:
            return self.refuse(endpoint, RefusalKind.BUSY, "every call slot is busy", self.retry_after_s)
        return persona

    def admit(self, req: CallRequest) -> CallSession | Refusal:
        checked = self.check(req.endpoint, req.dialled, req.persona)
        if isinstance(checked, Refusal):
            return checked
        try:
            sess = self.scheduler.admit(checked, req.dialled or checked.id, req.endpoint, call_id=req.call_id,
                                        caller=req.caller)
        except CallRefused as exc:
            return self.refuse(req.endpoint, RefusalKind(exc.code), exc.reason, exc.retry_after)
        self._start(sess, req)
        return sess
