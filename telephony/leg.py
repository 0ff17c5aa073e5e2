"""CallLeg: what every transport does with a call, so that a transport's own module holds only
its protocol.

A leg owns, for one call: capture (caller audio resampled to 24 kHz once, statefully), playout
(agent audio at the transport's rate and packet size, with the barge-in generation), the
endpoint-labelled metrics, and the hop of call events from the engine and VAD threads to the
transport's own thread or event loop. On that thread it reacts with defaults a transport may
override: live -> `on_live` (answer), barge-in -> `flush_far_end` (drop what the far end
buffered), ended -> `close`, DTMF -> call control (`telephony.control`).
"""

from __future__ import annotations

import asyncio
from typing import Callable

import numpy as np

from agent.events import BargeIn, CallEvent, CallState, Ended, EndReason, StateChanged
from agent.metrics import Metrics
from agent.session import CallSession
from telephony.audio import Capture, Playout
from telephony.control import CallControl

#: Delivers an event to the leg's own thread or loop, where `CallLeg.on_event` runs.
Hop = Callable[[CallEvent], None]


def loop_hop(loop: asyncio.AbstractEventLoop, handler: Callable[[CallEvent], None]) -> Hop:
    """For asyncio transports: events run `handler` on `loop`."""
    return lambda ev: loop.call_soon_threadsafe(handler, ev)


class CallLeg:
    can_transfer = False

    def __init__(self, session: CallSession, *, endpoint: str, metrics: Metrics, in_rate: int | None,
                 out_rate: int, out_packet: int, hop: Hop | None = None, control: CallControl | None = None):
        """`in_rate`: the caller audio rate `audio_in` takes (None: decoded frames, `frame_in`);
        `out_rate`/`out_packet`: what the transport sends; `hop`: how events reach this leg's
        thread (default: the running asyncio loop)."""
        self.session = session
        self.endpoint = endpoint
        self.metrics = metrics
        self.capture = Capture(session, in_rate)
        self.playout = Playout(session, out_rate, out_packet,
                               on_underrun=lambda cause: metrics.playout_underruns.labels(endpoint, cause).inc())
        self.control = control or CallControl()
        self.transfer_pending = False
        session.subscribe(hop or loop_hop(asyncio.get_running_loop(), self.on_event))

    # -- from the transport (its own thread) ---------------------------------------------------
    def audio_in(self, pcm: np.ndarray) -> None:
        """Caller audio, float32 mono at `in_rate`."""
        self.capture.push(pcm)

    def frame_in(self, frame) -> None:
        """Caller audio as a decoded av.AudioFrame (any rate and layout)."""
        self.capture.push_frame(frame)

    def dtmf_in(self, digit: str) -> None:
        self.metrics.dtmf.labels(self.endpoint).inc()
        self.session.dtmf(digit)
        self.control.on_dtmf(self, digit)

    def hangup(self, reason: EndReason = EndReason.CALLER_HANGUP) -> None:
        """The caller's side ended the call."""
        self.session.hangup(reason)

    # -- session events (on the transport's thread) --------------------------------------------
    def on_event(self, ev: CallEvent) -> None:
        self.forward(ev)
        if isinstance(ev, StateChanged) and ev.state is CallState.LIVE:
            self.on_live()
        elif isinstance(ev, BargeIn):
            self.on_barge_in(ev.generation)
        elif isinstance(ev, Ended):
            self.on_ended(ev.reason)

    def forward(self, ev: CallEvent) -> None:
        """Every event, before the reactions below (a transport with a side channel sends it on)."""

    def on_live(self) -> None:
        """The call's first agent frame exists: answer, if the transport has an answer."""

    def on_barge_in(self, generation: int) -> None:
        self.flush_far_end()

    def flush_far_end(self) -> None:
        """Drop agent audio already handed to the far end (its buffers, not ours: playout and
        session drop theirs by generation)."""

    def on_ended(self, reason: EndReason) -> None:
        self.close(reason)

    def close(self, reason: EndReason) -> None:
        """The agent side ends the call on the wire."""

    def start_transfer(self, target: str) -> None:
        raise NotImplementedError
