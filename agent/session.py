"""One call as the scheduler and an endpoint see it: audio in, audio and events out.

Endpoints (asyncio, pjsua2 threads) push caller audio and pull agent frames; the engine thread
takes one 80 ms frame per tick and delivers one. Both directions are bounded: inbound keeps at
most a few frames of backlog, outbound a frame or two of slack, so latency can never build up.
On barge-in the outbound queue is flushed and the playout generation bumped; an endpoint drops
any frame it still holds from an older generation.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import structlog

from agent.barge_in import BargeInConfig, BargeInDetector
from agent.personas.schema import Persona

FRAME = 1920  # samples per 80 ms model frame at 24 kHz
SAMPLE_RATE = 24000
# Inbound alignment: a caller's packets arrive on the endpoint's clock, frames are taken on the
# engine's. Whatever is left over after each take waits a whole extra tick, so a standing
# backlog is pure latency. When the backlog never dropped below ALIGN_MAX over ALIGN_WINDOW
# ticks, the oldest samples are dropped to leave ALIGN_KEEP (once per call, or after drift).
ALIGN_WINDOW = 8
ALIGN_MAX = 240  # 10 ms
ALIGN_KEEP = 48  # 2 ms of margin for packet jitter

_ids = itertools.count(1)


@dataclass
class OutFrame:
    pcm: np.ndarray  # [1920] float32, 24 kHz
    text: str | None
    generation: int
    seq: int


@dataclass
class Event:
    kind: str  # "state", "text", "barge_in", "dtmf", "ended"
    data: dict = field(default_factory=dict)


@dataclass
class CallStats:
    frames_in: int = 0
    frames_out: int = 0
    late_inbound: int = 0
    inbound_dropped: int = 0
    caller_peak: float = 0.0  # loudest caller sample the model heard (is audio reaching us?)
    inbound_realigned: int = 0  # times standing inbound backlog was trimmed to cut latency
    outbound_dropped: int = 0
    playout_underruns: int = 0
    engine_overruns: int = 0
    barge_ins: int = 0
    barge_ins_suppressed: int = 0


class CallSession:
    def __init__(self, persona: Persona, number: str, endpoint: str, barge_in: BargeInConfig,
                 outbound_depth: int = 2, inbound_backlog: int = 3, call_id: str | None = None):
        self.call_id = call_id or f"{endpoint}-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        self.persona = persona
        self.number = number
        self.endpoint = endpoint
        self.created = time.monotonic()
        self.answered_at: float | None = None
        self.placed_tick = 0  # engine tick at admission; answer latency in ticks is load-independent
        self.answer_ticks: int | None = None
        self.ended_at: float | None = None
        self.state = "preparing"
        self.end_reason: str | None = None
        self.stats = CallStats()
        self.generation = 0
        self.slot: int | None = None
        self.from_snapshot = False
        self.live_frames = 0
        self.last_activity = time.monotonic()
        self.log = structlog.get_logger("agent.call").bind(call_id=self.call_id, persona=persona.id,
                                                           number=number, endpoint=endpoint)
        self._lock = threading.Lock()
        self._in = np.zeros(0, dtype=np.float32)
        self._in_max = inbound_backlog * FRAME
        self._after_take: collections.deque[int] = collections.deque(maxlen=ALIGN_WINDOW)
        self._out: collections.deque[OutFrame] = collections.deque()
        self._out_depth = outbound_depth
        self._seq = 0
        self._listeners: list[Callable[[Event], None]] = []
        self.detector = BargeInDetector(barge_in)
        self.on_audio_in: Callable[["CallSession", np.ndarray], None] | None = None  # set by the scheduler (VAD)
        self.on_hangup: Callable[["CallSession", str], None] | None = None  # set by the scheduler
        self.recorder: Callable | None = None  # (caller frame, agent frame, text, index), engine thread

    # -- endpoint side ------------------------------------------------------------------------
    def push_audio(self, pcm: np.ndarray) -> None:
        """Caller audio, 24 kHz mono float32, any length (endpoints resample at their edge)."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        with self._lock:
            self._in = np.concatenate([self._in, pcm])
            excess = len(self._in) - self._in_max
            if excess > 0:  # the engine fell behind or the endpoint bursts: keep the newest audio
                self._in = self._in[excess:]
                self.stats.inbound_dropped += excess // FRAME or 1
            self.last_activity = time.monotonic()
        if self.on_audio_in is not None:
            self.on_audio_in(self, pcm)

    def pull_frame(self) -> OutFrame | None:
        """The next agent frame, or None (the endpoint plays silence and counts an underrun)."""
        with self._lock:
            self.last_activity = time.monotonic()
            return self._out.popleft() if self._out else None

    def count_underrun(self, n: int = 1) -> None:
        self.stats.playout_underruns += n

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Events arrive on the engine or VAD thread: listeners must only hand them over."""
        self._listeners.append(listener)

    def hangup(self, reason: str = "caller_hangup") -> None:
        if self.on_hangup is not None and self.state != "ended":
            self.on_hangup(self, reason)

    def dtmf(self, digit: str) -> None:
        self.emit("dtmf", digit=digit)

    # -- engine side --------------------------------------------------------------------------
    def emit(self, kind: str, **data) -> None:
        ev = Event(kind, data)
        for listener in list(self._listeners):
            try:
                listener(ev)
            except Exception:
                self.log.exception("event_listener_failed", kind=kind)

    def set_state(self, state: str) -> None:
        self.state = state
        self.emit("state", state=state)

    def take_inbound(self) -> np.ndarray | None:
        with self._lock:
            if len(self._in) < FRAME:
                return None
            frame, self._in = self._in[:FRAME], self._in[FRAME:]
            self._after_take.append(len(self._in))
            if len(self._after_take) == ALIGN_WINDOW and min(self._after_take) > ALIGN_MAX:
                drop = min(self._after_take) - ALIGN_KEEP
                self._in = self._in[drop:]
                self._after_take.clear()
                self.stats.inbound_realigned += 1
        self.stats.caller_peak = max(self.stats.caller_peak, float(np.abs(frame).max()))
        return frame

    def deliver(self, pcm: np.ndarray, text: str | None, now: float) -> None:
        with self._lock:
            self._seq += 1
            self._out.append(OutFrame(pcm, text, self.generation, self._seq))
            while len(self._out) > self._out_depth:  # never let stale speech queue up
                self._out.popleft()
                self.stats.outbound_dropped += 1
            self.detector.on_agent_frame(pcm, now)
        self.stats.frames_out += 1
        if text:
            self.emit("text", text=text)

    def barge_in(self) -> None:
        """The caller talks over the agent: drop queued speech now."""
        with self._lock:
            self.generation += 1
            self._out.clear()
        self.stats.barge_ins += 1
        self.emit("barge_in", generation=self.generation)

    @property
    def duration(self) -> float:
        end = self.ended_at or time.monotonic()
        return end - (self.answered_at or end)
