"""CallLeg: what every transport does with a call, so that a transport's own module holds only
its protocol.

A leg owns, for one call: capture (caller audio resampled to 24 kHz once, statefully), playout
(agent audio at the transport's rate and packet size, with the barge-in generation), the
endpoint-labelled metrics, and the hop of call events from the engine and VAD threads to the
transport's own thread or event loop. On that thread it reacts with defaults a transport may
override: live -> `on_live` (answer), barge-in -> `flush_far_end` (drop what the far end
buffered), ended -> `close`, DTMF -> call control (`telephony.control`).

A leg is made from an admitted call that has not started; it subscribes to the call's events
first, and the transport calls `start()` when it is ready for them (SIP: after 180 Ringing), so
no event can be missed and nothing re-checks the call's state.
"""

from __future__ import annotations

import asyncio
import enum
import time
from typing import Callable

import numpy as np

from agent.calls.events import BargeIn, CallEvent, CallState, Ended, EndReason, StateChanged, TransferOrdered
from agent.metrics import Metrics
from telephony.admission import AdmittedCall
from telephony.audio.edge import Capture, Playout
from telephony.control import CallControl

#: Delivers an event to the leg's own thread or loop, where `CallLeg.on_event` runs.
Hop = Callable[[CallEvent], None]


class LossKind(str, enum.Enum):
    """Why caller audio that should have reached the call did not (counted per call, in the
    `call_end` line and the call record, and in `personaplex_caller_audio_lost_seconds_total`).
    The engine's own latency bound is apart: `caller_audio_dropped_s`."""

    NETWORK = "network"  # RTP packets that never arrived (sequence gaps: RTCP's cumulative loss)
    JITTER = "jitter"  # packets that arrived too late or out of order for the jitter buffer, discarded
    BRIDGE_OVERRUN = "bridge_overrun"  # the SIP port's queue was full: the SIP thread fell behind the bridge clock
    # carrier frames given up: missing when the reorder window moved past them (one that turns
    # up later is dropped then, already counted; a re-sent copy of a played frame is no loss)
    REORDER_GAP = "reorder_gap"

    def __str__(self) -> str:
        return self.value


def loop_hop(loop: asyncio.AbstractEventLoop, handler: Callable[[CallEvent], None]) -> Hop:
    """For asyncio transports: events run `handler` on `loop`."""
    return lambda ev: loop.call_soon_threadsafe(handler, ev)


class CallLeg:
    can_transfer = False

    def __init__(self, call: AdmittedCall, *, endpoint: str, metrics: Metrics, in_rate: int | None,
                 out_rate: int, out_packet: int, hop: Hop | None = None, control: CallControl | None = None):
        """`in_rate`: the caller audio rate `audio_in` takes (None: decoded frames, `frame_in`);
        `out_rate`/`out_packet`: what the transport sends; `hop`: how events reach this leg's
        thread (default: the running asyncio loop)."""
        self.call = call
        self.session = session = call.session
        self.endpoint = endpoint
        self.metrics = metrics
        self.capture = Capture(session, in_rate)
        self.playout = Playout(session, out_rate, out_packet,
                               on_underrun=lambda cause: metrics.playout_underruns.labels(endpoint, cause).inc())
        self.control = control or CallControl()
        self.transfer_pending = False
        # when caller media last arrived (monotonic; None: the watch is not armed yet). Each
        # transport says what counts as media (RTP packets, track frames, carrier media frames):
        # decoded audio alone would not do, since a jitter buffer conceals a silent peer
        self.last_media: float | None = None
        session.subscribe(hop or loop_hop(asyncio.get_running_loop(), self.on_event))

    def start(self) -> None:
        """Start the call (its prompt into the model): the leg listens to its events already."""
        self.call.start()

    # -- from the transport (its own thread) ---------------------------------------------------
    def audio_in(self, pcm: np.ndarray) -> None:
        """Caller audio, float32 mono at `in_rate`."""
        self.capture.push(pcm)

    def frame_in(self, frame) -> None:
        """Caller audio as a decoded av.AudioFrame (any rate and layout)."""
        self.capture.push_frame(frame)

    def count_lost(self, kind: LossKind, seconds: float) -> None:
        """Caller audio the transport should have delivered and did not (its own thread)."""
        if seconds <= 0:
            return
        lost = self.session.stats.caller_lost
        lost[kind.value] = lost.get(kind.value, 0.0) + seconds
        self.metrics.caller_audio_lost.labels(self.endpoint, kind.value).inc(seconds)

    def media_arrived(self) -> None:
        """Caller media arrived (this also arms the watch)."""
        self.last_media = time.monotonic()

    def arm_media_watch(self) -> None:
        """Media is due from now on (call set up): silence from here on counts."""
        if self.last_media is None:
            self.last_media = time.monotonic()

    def media_timed_out(self, timeout_s: float) -> bool:
        """No caller media for `timeout_s` since the watch was armed: the call ends with
        `media_timeout` (True once it did). The caller's side is gone without hanging up."""
        if self.last_media is None or time.monotonic() - self.last_media <= timeout_s:
            return False
        if self.session.state is CallState.ENDED:
            return False
        self.session.log.warning("media_timeout", seconds=timeout_s)
        self.last_media = None  # once
        self.hangup(EndReason.MEDIA_TIMEOUT)
        return True

    async def watch_media(self, timeout_s: float, done: Callable[[], bool]) -> None:
        """For asyncio transports: check the media clock until `done()` or the call timed out."""
        while not done():
            await asyncio.sleep(min(0.25, timeout_s / 4))
            if self.media_timed_out(timeout_s):
                return

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
        elif isinstance(ev, TransferOrdered):
            self.control.order_transfer(self, ev.target, ev.by)

    def forward(self, ev: CallEvent) -> None:
        """Every event, before the reactions below (a transport with a side channel sends it on)."""

    def on_live(self) -> None:
        """The call's first agent frame exists: answer, if the transport has an answer."""

    def on_barge_in(self, generation: int) -> None:
        self.flush_far_end()

    def flush_far_end(self) -> None:
        """Drop agent audio already handed to the far end (its buffers, not ours: playout and
        session drop theirs by generation), and `count_flushed` what went."""

    def count_flushed(self, seconds: float) -> None:
        """Agent audio a barge-in dropped at the far end (the transport's thread)."""
        self.session.stats.barge_in_flushed_s += max(0.0, seconds)

    def on_ended(self, reason: EndReason) -> None:
        self.close(reason)

    def close(self, reason: EndReason) -> None:
        """The agent side ends the call on the wire."""

    def start_transfer(self, target: str) -> None:
        raise NotImplementedError
