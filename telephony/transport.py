"""What every transport implements, and the narrow context each is given.

A transport (SIP, WebRTC, Twilio, Telnyx) turns its wire into calls. It never sees the server
process: it is given the one door calls go through (`Admission`: route, admit, refuse, "could
a call be taken now?"), the metrics, its own configuration section, and the few facts of the
process it needs (the HTTP proxies it may trust, the voices and sampling defaults the
playground offers). The runtime builds every enabled transport from such a context and starts
them all in one loop; HTTP transports add their routes before the public app starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from aiohttp import web

from agent.metrics import Metrics
from telephony.admission import Admission
from telephony.security.replay import LocalReplayStore, ReplayStore


@dataclass(frozen=True)
class Catalog:
    """What the process offers callers who build their own persona (the playground)."""

    voices: Callable[[], list[str]]  # voice names the model has
    sampling: Any  # the engine's default sampling settings (server config model)


@dataclass(frozen=True)
class TransportContext:
    admission: Admission
    metrics: Metrics
    config: Any  # the transport's own config section (e.g. `ServerConfig.sip`)
    media_timeout_s: float  # no caller media this long ends a call (`ServerConfig.media_timeout_s`)
    trusted_proxies: tuple[str, ...] = ()  # HTTP proxies whose X-Forwarded-For entries count
    catalog: Catalog | None = None
    queue: Any = None  # `ServerConfig.queue` (hold callers while every slot is busy), or None
    hold_audio: Any = None  # telephony.audio.hold.HoldAudio, when the queue is on
    # where used single-use credentials (call-token ids, Twilio stream grants) are remembered: one
    # store for the process (the runtime's), Redis shared by a farm (`webrtc.tokens.replay_store`)
    replay_store: ReplayStore = field(default_factory=LocalReplayStore)


class Transport(Protocol):
    """The three verbs the runtime uses; everything else is the transport's own."""

    name: str

    def add_routes(self, app: web.Application) -> None:
        """Its HTTP routes on the public app (before the app starts); transports without any
        add none."""

    async def start(self) -> None:
        """Listen for calls (after the model is warm)."""

    async def stop(self) -> None:
        """Stop listening and end what is left (the scheduler has hung calls up already)."""


__all__ = ["Catalog", "Transport", "TransportContext"]
