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
    RTP_TIMEOUT = "rtp_timeout"
    SESSION_EXPIRED = "session_expired"  # SIP session timer (RFC 4028) ran out
    ENDPOINT_TIMEOUT = "endpoint_timeout"  # the endpoint stopped pushing and pulling audio
    MAX_DURATION = "max_duration"
    CONTEXT_LIMIT = "context_limit"
    TRANSFERRED = "transferred"
    SHUTDOWN = "shutdown"  # the drain timeout passed
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
class Ended:
    reason: EndReason


CallEvent = StateChanged | TextOut | BargeIn | BargeInSuppressed | Dtmf | Hold | TransferFailed | Ended
