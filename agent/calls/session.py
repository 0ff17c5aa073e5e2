"""One call as a transport sees it: caller audio in, agent audio and typed events out.

Transports (asyncio, pjsua2 threads) push caller audio and pull agent frames; the engine thread
takes one 80 ms frame per tick and delivers one. How the scheduler runs the call (its slot, its
clock) is not here: that is the scheduler's `CallBinding`.

Who writes what (one thread per field; readers on other threads see a recent value):
- the transport's thread: the inbound buffer (`push_audio`, under the lock), `last_activity`,
  `stats.caller_dropped_samples`, `stats.playout_underruns`, `stats.underruns_after_barge_in`;
- the engine thread: `state`, `answered_at`, `answer_ticks`, `ended_at`, `end_reason`, the
  outbound queue (`deliver`, under the lock), every other engine-side counter in `stats`,
  `reprimes`, the agent side of `transcript`, `prompt` once rendered (the preparation thread
  renders it before the engine thread ever reads it);
- the VAD thread: `generation` (under the lock), `stats.barge_ins*`, the detector's state;
- the event loop, before the call starts: `variables`.

Inbound, nothing the caller says is thrown away lightly: audio waits, in order, until the engine
consumes it (a late tick is caught up by extra steps, see `agent.calls.scheduler`), and only audio
older than the latency bound (`max_latency_ms`, default 400 ms) is dropped, counted to the
sample. Outbound keeps a frame or two of slack: stale speech never queues up. On barge-in the
outbound queue is flushed and the playout generation bumped; an endpoint drops any frame it
still holds from an older generation.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import structlog

from agent.barge_in.detector import BargeInConfig, BargeInDetector
from agent.calls.events import (BargeIn, CallEvent, CallState, Dtmf, EndReason, Hold, Levels, Reprime,
                                StateChanged, TextOut, TransferFailed, TransferRequested)
from agent.calls.transcript import Transcript, TranscriptPiece
from agent.personas.schema import Persona
from agent.timebase import FRAME, FRAME_S, SAMPLE_RATE, ms_to_samples

__all__ = ["FRAME", "SAMPLE_RATE", "AgentFrame", "CallOwner", "CallSession", "CallStats", "FrameTap", "InboundAudio"]

_ids = itertools.count(1)

#: agent frames per `Levels` event (240 ms: about 4 a second per call)
LEVEL_FRAMES = 3

#: events kept in a call's journal (records, webhooks): what happened besides words and state
JOURNALED = (BargeIn, Dtmf, Hold, TransferRequested, TransferFailed, Reprime)


@dataclass
class AgentFrame:
    """An agent frame waiting for the transport to play it."""

    pcm: np.ndarray  # [1920] float32, 24 kHz
    text: str | None
    generation: int
    seq: int


@dataclass
class CallStats:
    frames_in: int = 0  # caller frames the model consumed
    frames_out: int = 0
    late_inbound: int = 0  # ticks the model heard silence: no caller frame for too long (stream paused)
    catch_up_steps: int = 0  # extra steps that consumed caller audio a late tick left waiting
    caller_dropped_samples: int = 0  # caller audio older than the latency bound, dropped
    caller_peak: float = 0.0  # loudest caller sample the model heard (is audio reaching us?)
    outbound_dropped: int = 0
    playout_underruns: int = 0  # endpoint had nothing to play: the engine was late
    underruns_after_barge_in: int = 0  # endpoint had nothing to play because a barge-in flushed it
    # agent audio already at the far end that barge-ins dropped (SIP: the port's queue; carriers:
    # sent and not yet reported played; WebRTC: none, the track pulls each packet): the
    # transport's thread writes it
    barge_in_flushed_s: float = 0.0
    engine_overruns: int = 0
    barge_ins: int = 0
    barge_ins_suppressed: int = 0
    # caller audio the transport should have delivered and did not, seconds by kind (see
    # `telephony.leg.LossKind`): written on the transport's thread, read at the call's end
    caller_lost: dict[str, float] = field(default_factory=dict)

    @property
    def caller_dropped_s(self) -> float:
        return self.caller_dropped_samples / SAMPLE_RATE

    @property
    def caller_lost_s(self) -> float:
        return sum(self.caller_lost.values())

    def lost(self) -> dict[str, float]:
        """The losses by kind, rounded to the millisecond (logs, records, the calls API)."""
        return {k: round(v, 3) for k, v in sorted(self.caller_lost.items()) if v > 0}


class CallOwner(Protocol):
    """Who runs the call (the scheduler): what a session passes on to it."""

    def hang_up(self, session: "CallSession", reason: EndReason) -> None:
        """The transport's side ended the call (any thread)."""

    def caller_audio(self, session: "CallSession", pcm: np.ndarray) -> None:
        """Caller audio as it arrives (the transport's thread): barge-in detection listens."""


#: (caller frame the model consumed or None, agent frame, agent text, frame index), engine thread
FrameTap = Callable[[np.ndarray | None, np.ndarray, str | None, int], None]


#: Caller audio kept while the call is not live yet (its prompt is being prefilled), at most.
PRE_ANSWER_MAX_S = 5.0


class InboundAudio:
    """Caller audio waiting for the engine: in order, whole, bounded by a latency limit.

    Audio that arrives before the call is live is not latency: the model cannot hear anything
    before its prompt is in, and a carrier stream (Twilio, Telnyx) sends the caller's audio from
    its `start`, a prefill before the agent's first frame. That audio is kept (up to
    PRE_ANSWER_MAX_S) and, once the call is live (`went_live`), counts as an allowance over the
    bound that shrinks as the engine consumes it: caught up by the scheduler's extra steps, the
    call is back within the bound with nothing dropped; an engine with no spare time drops the
    excess once the allowance is used up, counted like any other (so nothing is lost unseen)."""

    def __init__(self, max_samples: int, live: bool = True):
        self.max_samples = max(max_samples, FRAME)
        self._buf = np.zeros(0, dtype=np.float32)
        self._live = live
        self._allowance = 0  # samples over the bound that arrived before the call was live

    def __len__(self) -> int:
        return len(self._buf)

    def went_live(self) -> None:
        """The call is live: what is buffered now was said before the answer."""
        self._live = True
        self._allowance = len(self._buf)  # all of it: audio said after the answer gets the whole bound

    def push(self, pcm: np.ndarray) -> int:
        """Append; returns how many of the oldest samples were dropped to respect the bound."""
        self._buf = np.concatenate([self._buf, pcm])
        bound = (self.max_samples + self._allowance) if self._live else max(
            self.max_samples, int(PRE_ANSWER_MAX_S * SAMPLE_RATE))
        excess = len(self._buf) - bound
        if excess > 0:
            self._buf = self._buf[excess:]
            self._allowance = max(self._allowance - excess, 0)
            return excess
        return 0

    def take(self, n: int) -> np.ndarray | None:
        if len(self._buf) < n:
            return None
        out, self._buf = self._buf[:n], self._buf[n:]
        self._allowance = max(self._allowance - n, 0)
        return out


class CallSession:
    def __init__(self, persona: Persona, number: str, endpoint: str, barge_in: BargeInConfig,
                 outbound_depth: int = 2, max_latency_ms: float = 400.0, call_id: str | None = None,
                 prompt: str | None = None, caller: str | None = None, owner: CallOwner | None = None):
        self.call_id = call_id or f"{endpoint}-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        self.persona = persona
        self.number = number  # what was dialled
        self.caller = caller  # who calls, when the transport says (SIP From user, carrier From)
        self.endpoint = endpoint  # the transport that brought it: "sip", "webrtc", "twilio", "telnyx"
        self.direction = "inbound"  # "outbound" for calls the agent places (call_start/call_end, records)
        # a placed call's dial state (telephony.outbound.DialState value: ringing, answered, busy...),
        # written on the dialler's thread; None for inbound calls
        self.dial_state: str | None = None
        # a placed call's answering-machine verdict ("human", "machine", "unknown"; None: not yet)
        self.amd: str | None = None
        self.prompt = prompt if prompt is not None else persona.prompt  # what the model is told
        self.variables: dict[str, str] = {}  # the per-call context the prompt was rendered with
        self.created = time.monotonic()
        # the same moment on the wall clock: `wall_time` turns the monotonic times below into
        # Unix times for records and webhooks without a second clock read that could disagree
        self.created_wall = time.time()
        self.answered_at: float | None = None
        self.answer_ticks: int | None = None  # engine ticks from admission to the first agent frame
        self.ended_at: float | None = None
        self.state = CallState.PREPARING
        self.end_reason: EndReason | None = None
        self.stats = CallStats()
        self.generation = 0
        # each re-prime's {"frame", "window", "swap"} (`agent.calls.reprime`; in call_end, records)
        self.reprimes: list[dict] = []
        # seconds the caller waited on hold for a free slot before this call took one (None: no
        # wait); set by the transport's queue, in call_end and the call record
        self.queue_wait_s: float | None = None
        self.transcript = Transcript()  # both sides' words (personal data: never logged)
        # the caller transcriber's semantic VAD: how likely the caller's turn has just ended
        # (0..1, latest frame; None without a transcriber or a model with that head)
        self.end_of_turn: float | None = None
        # (t on the call's clock, event) for the `JOURNALED` events, in order: records and webhooks
        self.journal: list[tuple[float, CallEvent]] = []
        self._level_sq = [0.0, 0.0]  # caller, agent: sums of squares since the last Levels event
        self._level_n = [0, 0]
        self.last_activity = time.monotonic()
        self.log = structlog.get_logger("agent.call").bind(call_id=self.call_id, persona=persona.id,
                                                           number=number, endpoint=endpoint)
        self._owner = owner
        self._lock = threading.Lock()
        self._in = InboundAudio(ms_to_samples(max_latency_ms), live=False)
        self._out: collections.deque[AgentFrame] = collections.deque()
        self._out_depth = outbound_depth
        self._seq = 0
        self._listeners: list[Callable[[CallEvent], None]] = []
        self._taps: list[FrameTap] = []
        self.detector = BargeInDetector(barge_in)

    # -- endpoint side ------------------------------------------------------------------------
    def push_audio(self, pcm: np.ndarray) -> None:
        """Caller audio, 24 kHz mono float32, any length (endpoints resample at their edge)."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        with self._lock:
            dropped = self._in.push(pcm)
            self.last_activity = time.monotonic()
        if dropped:
            self.stats.caller_dropped_samples += dropped
        if self._owner is not None:
            self._owner.caller_audio(self, pcm)

    def pull_frame(self) -> AgentFrame | None:
        """The next agent frame, or None (the endpoint plays silence and counts an underrun)."""
        with self._lock:
            self.last_activity = time.monotonic()
            return self._out.popleft() if self._out else None

    def count_underrun(self, after_barge_in: bool = False) -> None:
        if after_barge_in:
            self.stats.underruns_after_barge_in += 1
        else:
            self.stats.playout_underruns += 1

    def subscribe(self, listener: Callable[[CallEvent], None]) -> None:
        """Events arrive on the engine or VAD thread: listeners must only hand them over."""
        self._listeners.append(listener)

    def add_frame_tap(self, tap: FrameTap) -> None:
        """Every frame the model consumed and produced, on the engine thread (records, levels):
        a tap must be quick and must not block."""
        self._taps.append(tap)

    def tap_frame(self, caller: np.ndarray | None, agent: np.ndarray, text: str | None, index: int) -> None:
        for tap in self._taps:
            try:
                tap(caller, agent, text, index)
            except Exception:
                self.log.exception("frame_tap_failed")

    def hangup(self, reason: EndReason = EndReason.CALLER_HANGUP) -> None:
        if self._owner is not None and self.state is not CallState.ENDED:
            self._owner.hang_up(self, EndReason(reason))

    def dtmf(self, digit: str) -> None:
        self.emit(Dtmf(digit))

    # -- engine side --------------------------------------------------------------------------
    def emit(self, event: CallEvent) -> None:
        if isinstance(event, JOURNALED):
            self.journal.append((self.clock, event))
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                self.log.exception("event_listener_failed", event=type(event).__name__)

    def set_state(self, state: CallState) -> None:
        if state is CallState.LIVE:
            with self._lock:
                self._in.went_live()
        self.state = state
        if state is CallState.ENDED:
            self.transcript.close()  # before anyone hears of the end: one final transcript
        self.emit(StateChanged(state))

    @property
    def clock(self) -> float:
        """Seconds on the call's clock: agent frames delivered since the answer (transcript time)."""
        return self.stats.frames_out * FRAME_S

    def wall_time(self, monotonic: float | None) -> float | None:
        """A `time.monotonic()` reading of this call (created, answered_at, ended_at) as Unix time."""
        return None if monotonic is None else self.created_wall + (monotonic - self.created)

    @property
    def inbound_samples(self) -> int:
        """Caller audio received and not yet consumed by the model."""
        return len(self._in)

    def take_inbound(self) -> np.ndarray | None:
        """One whole frame of caller audio, oldest first, or None if it has not all arrived."""
        with self._lock:
            frame = self._in.take(FRAME)
        if frame is not None:
            self.stats.caller_peak = max(self.stats.caller_peak, float(np.abs(frame).max()))
            self._level_sq[0] += float(np.dot(frame, frame))
            self._level_n[0] += len(frame)
        return frame

    def deliver(self, pcm: np.ndarray, text: str | None, now: float) -> None:
        with self._lock:
            self._seq += 1
            self._out.append(AgentFrame(pcm, text, self.generation, self._seq))
            while len(self._out) > self._out_depth:  # never let stale speech queue up
                self._out.popleft()
                self.stats.outbound_dropped += 1
            self.detector.on_agent_frame(pcm, now)
        index = self.stats.frames_out  # the frame's place on the call's clock (0: the answer)
        self.stats.frames_out += 1
        if text:
            self.emit(TextOut(text))
            self.said(TranscriptPiece("agent", index * FRAME_S, (index + 1) * FRAME_S, text))
        self._level_sq[1] += float(np.dot(pcm, pcm))
        self._level_n[1] += len(pcm)
        if self.stats.frames_out % LEVEL_FRAMES == 0:
            sq, n = self._level_sq, self._level_n
            self.emit(Levels(math.sqrt(sq[0] / n[0]) if n[0] else 0.0, math.sqrt(sq[1] / n[1]) if n[1] else 0.0))
            self._level_sq, self._level_n = [0.0, 0.0], [0, 0]

    def said(self, piece: TranscriptPiece) -> None:
        """A piece of either side's words: into the call's transcript, then to listeners (a piece
        after the call's end is neither: see `Transcript.close`)."""
        n = self.transcript.add(piece)
        if n:
            self.emit(dataclasses.replace(piece, n=n))

    @property
    def outbound_depth(self) -> int:
        """Agent frames produced and not yet pulled by the endpoint."""
        return len(self._out)

    def barge_in(self) -> None:
        """The caller talks over the agent: drop queued speech now."""
        with self._lock:
            self.generation += 1
            self._out.clear()
        self.stats.barge_ins += 1
        self.emit(BargeIn(self.generation))

    @property
    def duration(self) -> float:
        end = self.ended_at or time.monotonic()
        return end - (self.answered_at or end)
