"""What a carrier media stream says, whatever the carrier: typed events and the wire interface.

Cloud carriers (Twilio Media Streams, Telnyx media streaming) carry a call's audio as JSON text
frames over a WebSocket. Each carrier's module (`telephony.streams.twilio`, `telephony.streams.telnyx`) turns its
frames into these events and our audio and commands into its frames, and nothing else; the
shared WebSocket transport (`telephony.streams.base`) does admission, audio, pacing, barge-in
and hang-up for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class WireError(ValueError):
    """A frame that does not follow the carrier's protocol (bad JSON, wrong types, bad base64,
    an oversized payload). The transport logs it; it never ends other calls."""


@dataclass(frozen=True)
class AudioFormat:
    encoding: str  # "mulaw" (G.711 u-law) or "l16" (16-bit linear PCM)
    rate: int  # samples per second
    channels: int = 1


@dataclass(frozen=True)
class Connected:
    """The socket is open (first message of both carriers). `auth_token`: what the carrier
    says it was configured with (Telnyx's `x-telnyx-streaming-auth-token`), checked before
    `start` is admitted."""

    auth_token: str | None = None


@dataclass(frozen=True)
class Started:
    """The stream starts: which call, which audio, and the parameters the carrier passed on."""

    stream_id: str  # Twilio streamSid / Telnyx stream_id: echoed in what we send
    call_id: str  # the carrier's call id (Twilio callSid, Telnyx call_control_id)
    audio: AudioFormat
    parameters: dict[str, str] = field(default_factory=dict)  # Twilio customParameters, Telnyx custom params
    caller: str | None = None  # From, when the carrier says
    dialled: str | None = None  # To, when the carrier says
    account_id: str | None = None  # the carrier account the call belongs to (Twilio accountSid)


@dataclass(frozen=True)
class MediaIn:
    """Caller audio: float32 mono in [-1, 1] at the stream's rate."""

    pcm: np.ndarray
    seq: int | None = None  # the carrier's sequence number, when it has one (for reordering)


@dataclass(frozen=True)
class DtmfIn:
    digit: str


@dataclass(frozen=True)
class MarkIn:
    """The carrier played (or, after a clear, dropped) everything we sent before this mark."""

    name: str


@dataclass(frozen=True)
class Stopped:
    """The carrier ended the stream (the call hung up or the stream was stopped)."""


@dataclass(frozen=True)
class Ignored:
    """A well-formed frame we have no use for (an unknown event, carrier errors)."""

    event: str


StreamEvent = Connected | Started | MediaIn | DtmfIn | MarkIn | Stopped | Ignored


class MediaStreamProtocol(Protocol):
    """One carrier's wire format, for one stream (it learns the stream id and audio format from
    `Started`). Parsing never raises anything but `WireError`."""

    name: str  # metrics/log label: "twilio", "telnyx"
    reorders: bool  # True when media frames may arrive out of order (reorder by MediaIn.seq)

    def parse(self, text: str) -> StreamEvent: ...

    def encode_media(self, pcm: np.ndarray) -> str:
        """Agent audio (float32 mono at the stream's rate) -> one media frame."""
        ...

    def encode_mark(self, name: str) -> str: ...

    def encode_clear(self) -> str: ...
