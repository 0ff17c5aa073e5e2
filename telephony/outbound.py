"""Calls the agent places: the request's checks, the slot, the state each call is in, and its end.

`Outbound.place` answers at once: it checks the request (allow-lists, persona direction,
capacity), takes a call slot through admission (so the call can start within a frame or two of
the callee's 200 OK: the slot is there, only the prompt remains), and hands the call to the
dialler (SIP), which reports what the far end does. The call's model starts only when the callee
answers, so its first frame is the reaction to the callee's "hello".

States (`DialState`): dialing -> ringing -> answered -> ended, or a final one instead of the
answer: busy, no_answer, declined, failed, or ended when cancelled. Ended calls stay readable for
`keep_ended_s`, at most `keep_ended_max` of them (the oldest go first).

Threads: `place`, `get` and `cancel` run on the server's event loop; `report` on the dialler's
thread; the end of an answered call arrives on the engine thread. One lock guards the records.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol

import structlog

from agent.calls.events import Ended, EndReason
from agent.calls.session import CallSession
from agent.personas.schema import Persona
from telephony.admission import Admission, AdmittedCall, CallRequest, Refusal, RefusalKind
from telephony.outbound_policy import Target, TargetError, allowed, parse_target

log = structlog.get_logger(__name__)


class DialState(str, enum.Enum):
    DIALING = "dialing"
    RINGING = "ringing"
    ANSWERED = "answered"
    BUSY = "busy"
    NO_ANSWER = "no_answer"
    DECLINED = "declined"
    FAILED = "failed"
    ENDED = "ended"

    def __str__(self) -> str:
        return self.value


FINAL = frozenset({DialState.BUSY, DialState.NO_ANSWER, DialState.DECLINED, DialState.FAILED, DialState.ENDED})


@dataclass(frozen=True)
class OutboundSettings:
    """`ServerConfig.outbound`, as the telephony layer takes it."""

    enabled: bool = False
    allowed_to: tuple[str, ...] = ()
    allowed_from: tuple[str, ...] = ()
    max_concurrent: int = 2
    reserve_inbound: int = 1
    default_ring_timeout_s: float = 30.0
    keep_ended_s: float = 600.0
    keep_ended_max: int = 1000
    amd: bool = True  # answering-machine detection after the answer
    on_machine: str = "hangup"  # "hangup" or "talk"


@dataclass
class OutboundCall:
    """One placed call: what was asked, and what became of it (wall-clock Unix times)."""

    call_id: str
    to: str
    caller_id: str | None  # the request's `from` (None: the agent's own SIP identity)
    persona: str
    ring_timeout_s: float
    admitted: AdmittedCall | None = None
    state: DialState = DialState.DIALING
    started_at: float = field(default_factory=time.time)
    answered_at: float | None = None
    ended_at: float | None = None
    reason: str | None = None  # why it ended: a SIP status ("486 Busy Here"), "ring_timeout", an end reason
    sip_status: int | None = None  # the far end's final answer, when it gave one
    amd: str | None = None  # "human", "machine", "unknown" (telephony.amd); None: not answered or not decided
    cancel_requested: bool = False
    _final_mono: float | None = None

    def view(self) -> dict:
        """GET /api/calls/{id} (README "Outbound calls")."""
        return {"call_id": self.call_id, "state": self.state.value, "direction": "outbound", "endpoint": "sip",
                "to": self.to, "from": self.caller_id, "persona": self.persona, "started_at": self.started_at,
                "answered_at": self.answered_at, "ended_at": self.ended_at, "reason": self.reason,
                "sip_status": self.sip_status, "amd": self.amd}


class Dialler(Protocol):
    """The transport that places calls (SIP)."""

    def number_host(self) -> str | None:
        """Where numbers are dialled (the trunk's host), or None: only URIs can be dialled."""

    def from_host(self) -> str:
        """The host of a number given as caller ID (the trunk's, else the agent's own)."""

    def dial(self, call: OutboundCall, uri: str, from_uri: str | None, outbound: "Outbound") -> None:
        """Place the call (any thread; returns at once); report its progress with `outbound.report`."""

    def cancel(self, call_id: str) -> None:
        """CANCEL a call not answered yet (any thread; nothing when it is gone)."""


class OutboundRefused(Exception):
    """A request refused before anything was dialled: the HTTP status, and a sentence for `error`."""

    def __init__(self, status: int, error: str, reason: str | None = None):
        super().__init__(error)
        self.status, self.error, self.reason = status, error, reason

    def body(self) -> dict:
        return {"error": self.error, **({"reason": self.reason} if self.reason else {})}


#: admission refusals of a slot, as the API says them
_REFUSED = {RefusalKind.BUSY: "capacity", RefusalKind.DRAINING: "draining", RefusalKind.UNAVAILABLE: "unavailable"}


class Outbound:
    def __init__(self, settings: OutboundSettings, admission: Admission, persona: Callable[[str], Persona | None],
                 dialler: Dialler | None):
        self.settings = settings
        self.admission = admission
        self._persona = persona
        self.dialler = dialler
        self._lock = threading.Lock()
        self._calls: dict[str, OutboundCall] = {}
        self._ended: collections.deque[str] = collections.deque()  # ended call ids, oldest first
        # called with each dialled call's session (its slot taken, nothing started): webhooks
        self.on_dial: list[Callable[[CallSession], None]] = []

    # -- the API (event loop) ------------------------------------------------------------------
    def place(self, to: str, persona_id: str, variables: dict[str, str], caller_id: str | None = None,
              ring_timeout_s: float | None = None) -> OutboundCall:
        """Check, take a slot, dial; OutboundRefused says why not (nothing is dialled then)."""
        s = self.settings
        if not s.enabled or self.dialler is None:
            raise OutboundRefused(403, "outbound calls are off (outbound.enabled, with sip.enabled)", "disabled")
        try:
            target = parse_target(to)
            source = parse_target(caller_id) if caller_id is not None else None
            uri = target.dial_uri(self.dialler.number_host())
        except TargetError as exc:
            raise OutboundRefused(400, str(exc)) from None
        if not allowed(target, list(s.allowed_to)):
            raise OutboundRefused(403, f"{target.text} is not in outbound.allowed_to", "allowed_to")
        if source is not None and not allowed(source, list(s.allowed_from)):
            raise OutboundRefused(403, f"from {source.text} is not in outbound.allowed_from", "allowed_from")
        persona = self._persona(persona_id)
        if persona is None:
            raise OutboundRefused(404, f"no persona {persona_id!r}", "persona")
        if persona.direction == "inbound":
            raise OutboundRefused(404, f"persona {persona.id} only answers calls (direction: inbound)", "persona")
        ring = ring_timeout_s if ring_timeout_s is not None else s.default_ring_timeout_s
        call = OutboundCall(f"out-{uuid.uuid4().hex[:16]}", target.text, source.text if source else None,
                            persona.id, ring)
        with self._lock:
            self._prune()
            self._take_slot(call, persona, variables)
            self._calls[call.call_id] = call
        sess = call.admitted.session
        sess.direction = "outbound"
        sess.dial_state = DialState.DIALING.value
        sess.subscribe(lambda ev: self._session_ended(call, ev) if isinstance(ev, Ended) else None)
        for hook in self.on_dial:
            try:
                hook(sess)
            except Exception:
                sess.log.exception("outbound_dial_hook_failed")
        sess.log.info("outbound_dial", ring_timeout_s=ring, from_given=source is not None)
        self.dialler.dial(call, uri, _from_uri(source, self.dialler.from_host()), self)
        return call

    def _take_slot(self, call: OutboundCall, persona: Persona, variables: dict[str, str]) -> None:
        """A slot for `call` (under the lock: two requests never both take the last one)."""
        s = self.settings
        live = sum(1 for c in self._calls.values() if c.state not in FINAL)
        if live >= s.max_concurrent:
            raise OutboundRefused(503, f"{live} outbound calls in progress (outbound.max_concurrent)", "capacity")
        sch = self.admission.scheduler
        if sch.capacity_left <= s.reserve_inbound:
            raise OutboundRefused(503, f"{sch.capacity_left} call slots free, {s.reserve_inbound} kept for "
                                       "inbound callers (outbound.reserve_inbound)", "capacity")
        if self.admission.queue.depth:
            raise OutboundRefused(503, "inbound callers are waiting for a slot", "capacity")
        got = self.admission.admit_outbound(CallRequest("sip", call.to, caller=call.caller_id, call_id=call.call_id,
                                                        variables=dict(variables), persona=persona))
        if isinstance(got, Refusal):
            raise OutboundRefused(503, got.reason, _REFUSED.get(got.kind, got.kind.value))
        # the callee's number or URI is personal data: never on the call's log lines (the
        # session keeps it for webhooks and records as `number`, the dialled number)
        got.session.log = got.session.log.unbind("number")
        call.admitted = got

    def get(self, call_id: str) -> OutboundCall | None:
        with self._lock:
            self._prune()
            return self._calls.get(call_id)

    def cancel(self, call_id: str) -> OutboundCall | None:
        """Hang up (answered: the agent ends the call, BYE) or cancel (dialing, ringing: CANCEL)."""
        with self._lock:
            call = self._calls.get(call_id)
            if call is None or call.state in FINAL:
                return call
            call.cancel_requested = True
            answered = call.state is DialState.ANSWERED
        if answered:
            call.admitted.session.hangup(EndReason.SUPERVISOR)
        else:
            self.dialler.cancel(call_id)
        return call

    @property
    def in_progress(self) -> int:
        with self._lock:
            return sum(1 for c in self._calls.values() if c.state not in FINAL)

    # -- from the dialler (its thread) and the engine -------------------------------------------
    def report(self, call_id: str, state: DialState, reason: str | None = None, sip_status: int | None = None) -> None:
        """The far end's progress. A final state is final: later reports are ignored."""
        with self._lock:
            call = self._calls.get(call_id)
            if call is None or call.state in FINAL or call.state is state:
                return
            if state is DialState.RINGING and call.state is not DialState.DIALING:
                return
            call.state = state
            now = time.time()
            if state is DialState.ANSWERED:
                call.answered_at = now
            if sip_status is not None:
                call.sip_status = sip_status
            if state in FINAL:
                self._finish(call, now, reason)
                self._count(call)
            if call.admitted is not None:
                call.admitted.session.dial_state = state.value  # before the session's end: call_end says it
        if call.admitted is not None:
            call.admitted.session.log.info("outbound_state", state=state.value, sip_status=sip_status,
                                           reason=reason)

    def amd(self, call_id: str, verdict: str) -> None:
        """The answering-machine verdict (the dialler's thread): recorded, and a machine is hung
        up on when `on_machine` says so."""
        with self._lock:
            call = self._calls.get(call_id)
            if call is None or call.amd is not None:
                return
            call.amd = verdict
        sess = call.admitted.session
        sess.amd = verdict
        hang_up = verdict == "machine" and self.settings.on_machine == "hangup"
        sess.log.info("amd", verdict=verdict, action="hangup" if hang_up else "talk")
        if hang_up:
            sess.hangup(EndReason.ANSWERING_MACHINE)

    def _session_ended(self, call: OutboundCall, ev: Ended) -> None:
        """An answered call ended (either side, or the agent): its final state (engine thread).
        An answered call with no machine verdict yet ends `unknown`."""
        with self._lock:
            if call.state is DialState.ANSWERED:
                call.state = DialState.ENDED
                self._finish(call, time.time(), ev.reason.value)
                if self.settings.amd and call.amd is None:
                    call.amd = call.admitted.session.amd = "unknown"
                self._count(call)

    def _finish(self, call: OutboundCall, now: float, reason: str | None) -> None:
        """(lock held) A final state: counted once it has its verdict (`_count`)."""
        call.ended_at = now
        call.reason = reason
        call._final_mono = time.monotonic()
        self._ended.append(call.call_id)

    def _count(self, call: OutboundCall) -> None:
        self.admission.metrics.outbound_calls.labels(call.state.value, call.amd or "none").inc()

    def _prune(self) -> None:
        """Forget ended calls past `keep_ended_s`, and the oldest beyond `keep_ended_max` (lock held)."""
        s = self.settings
        now = time.monotonic()
        while self._ended:
            oldest = self._calls.get(self._ended[0])
            expired = oldest is None or oldest._final_mono is None or now - oldest._final_mono > s.keep_ended_s
            if not expired and len(self._ended) <= s.keep_ended_max:
                break
            self._calls.pop(self._ended.popleft(), None)


def _from_uri(source: Target | None, host: str) -> str | None:
    """The From URI for a caller ID: a URI as given, a number at `host` (None: the account's own)."""
    if source is None:
        return None
    return source.text if source.is_uri else f"sip:{source.text}@{host}"


def final_state(status: int) -> DialState:
    """A final SIP answer to our INVITE (no 2xx) as a call state: 486/600 busy, 603 declined,
    408/480 (and 487, when the far end's own timer cancelled it) no answer, anything else failed."""
    if status in (486, 600):
        return DialState.BUSY
    if status == 603:
        return DialState.DECLINED
    if status in (408, 480, 487):
        return DialState.NO_ANSWER
    return DialState.FAILED
