"""What a call can be and what can happen to it, as types rather than strings.

Transports, the recorder and the page's wire protocol all react to these; a typo in a string
would silently never match, a typo in an enum member fails at import. The enums are `str`
subclasses so that they log and serialise as their plain values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class CallState(str, enum.Enum):
    PREPARING = "preparing"  # admitted; prompt being built / prefilled
    ANSWERING = "answering"  # prompt in the model; the first agent frame comes from the next step
    LIVE = "live"  # the agent's frames flow; the call is answered
    ENDED = "ended"

    def __str__(self) -> str:
        return self.value


class EndReason(str, enum.Enum):
    CALLER_HANGUP = "caller_hangup"  # BYE / page hang-up / carrier stop
    CANCELLED = "cancelled"  # the caller gave up before the answer
    CALLER_GONE = "caller_gone"  # the caller's media stream ended
    CONNECTION_LOST = "connection_lost"
    CLOSED = "closed"  # the transport closed under us
    ICE_TIMEOUT = "ice_timeout"
    MEDIA_TIMEOUT = "media_timeout"  # no caller media (RTP, track, carrier frames) for media_timeout_s
    SESSION_EXPIRED = "session_expired"  # SIP session timer (RFC 4028) ran out
    ENDPOINT_TIMEOUT = "endpoint_timeout"  # the endpoint stopped pushing and pulling audio
    MAX_DURATION = "max_duration"
    CONTEXT_LIMIT = "context_limit"
    TRANSFERRED = "transferred"
    SHUTDOWN = "shutdown"  # the drain timeout passed
    SUPERVISOR = "supervisor"  # a supervisor hung up from the console
    ANSWERING_MACHINE = "answering_machine"  # a call the agent placed reached a machine (outbound.on_machine: hangup)
    FAILED = "failed"  # our fault: a setup error or an engine failure

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class StateChanged:
    state: CallState


@dataclass(frozen=True)
class TextOut:
    """A piece of the agent's text (a sentencepiece piece, spaces as ' ')."""

    text: str


@dataclass(frozen=True)
class BargeIn:
    """The caller talked over the agent: audio of older generations must not be played."""

    generation: int


@dataclass(frozen=True)
class BargeInSuppressed:
    """Caller speech that started too soon after the agent did (line echo): ignored."""


@dataclass(frozen=True)
class Dtmf:
    digit: str


@dataclass(frozen=True)
class Hold:
    on: bool


@dataclass(frozen=True)
class TransferFailed:
    status: int


@dataclass(frozen=True)
class TransferOrdered:
    """A supervisor asked that the caller be transferred to `target` (the call's leg acts on it,
    on its own thread); `by` names who asked."""

    target: str
    by: str


@dataclass(frozen=True)
class TransferRequested:
    """Call control asked the transport to transfer the caller to a person (`target`)."""

    target: str


@dataclass(frozen=True)
class Levels:
    """How loud each side was over the last few frames (RMS of float samples, 0..1): what a live
    view draws. Emitted every `LEVEL_FRAMES` agent frames, so at most ~4 a second per call."""

    caller: float
    agent: float


@dataclass(frozen=True)
class Reprime:
    """The call's model state was rebuilt (`agent.calls.reprime`): swapped in after agent frame
    `frame`, keeping `window` frames of conversation; `swap` is "quiet" or "deadline"."""

    frame: int
    window: int
    swap: str


@dataclass(frozen=True)
class Ended:
    reason: EndReason


from agent.calls.transcript import TranscriptPiece  # noqa: E402 (a piece of either side's words)

CallEvent = (StateChanged | TextOut | TranscriptPiece | BargeIn | BargeInSuppressed | Dtmf | Hold | TransferRequested
             | TransferOrdered | TransferFailed | Levels | Reprime | Ended)


def common_json(ev: CallEvent) -> dict | None:
    """The JSON both the browser page and operators' tools use for the events they share (the
    page protocol and the ops stream each add their own for the rest), or None."""
    if isinstance(ev, StateChanged):
        return {"type": "state", "state": ev.state.value}
    if isinstance(ev, BargeIn):
        return {"type": "barge_in", "generation": ev.generation}
    if isinstance(ev, Dtmf):
        return {"type": "dtmf", "digit": ev.digit}
    if isinstance(ev, Hold):
        return {"type": "hold", "on": ev.on}
    if isinstance(ev, TransferFailed):
        return {"type": "transfer_failed", "status": ev.status}
    return None
