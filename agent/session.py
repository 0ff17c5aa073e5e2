"""One call as the scheduler and an endpoint see it: audio in, audio and events out.

Endpoints (asyncio, pjsua2 threads) push caller audio and pull agent frames; the engine thread
takes one 80 ms frame per tick and delivers one.

Inbound, nothing the caller says is thrown away lightly: audio waits, in order, until the engine
consumes it (a late tick is caught up by extra steps, see `agent.scheduler`), and only audio
older than the latency bound (`max_latency_ms`, default 400 ms) is dropped, counted to the
sample. Outbound keeps a frame or two of slack: stale speech never queues up. On barge-in the
outbound queue is flushed and the playout generation bumped; an endpoint drops any frame it
still holds from an older generation.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np
import structlog

from agent.barge_in import BargeInConfig, BargeInDetector
from agent.events import (BargeIn, CallEvent, CallState, Dtmf, EndReason, StateChanged, TextOut)
from agent.personas.schema import Persona
from agent.timebase import FRAME, SAMPLE_RATE, ms_to_samples

__all__ = ["FRAME", "SAMPLE_RATE", "CallSession", "CallStats", "InboundAudio", "OutFrame"]

_ids = itertools.count(1)


@dataclass
class OutFrame:
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
    engine_overruns: int = 0
    barge_ins: int = 0
    barge_ins_suppressed: int = 0

    @property
    def caller_dropped_s(self) -> float:
        return self.caller_dropped_samples / SAMPLE_RATE


class InboundAudio:
    """Caller audio waiting for the engine: in order, whole, bounded by a latency limit."""

    def __init__(self, max_samples: int):
        self.max_samples = max(max_samples, FRAME)
        self._buf = np.zeros(0, dtype=np.float32)

    def __len__(self) -> int:
        return len(self._buf)

    def push(self, pcm: np.ndarray) -> int:
        """Append; returns how many of the oldest samples were dropped to respect the bound."""
        self._buf = np.concatenate([self._buf, pcm])
        excess = len(self._buf) - self.max_samples
        if excess > 0:
            self._buf = self._buf[excess:]
            return excess
        return 0

    def take(self, n: int) -> np.ndarray | None:
        if len(self._buf) < n:
            return None
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


class CallSession:
    def __init__(self, persona: Persona, number: str, endpoint: str, barge_in: BargeInConfig,
                 outbound_depth: int = 2, max_latency_ms: float = 400.0, call_id: str | None = None,
                 prompt: str | None = None, caller: str | None = None):
        self.call_id = call_id or f"{endpoint}-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        self.persona = persona
        self.number = number  # what was dialled
        self.caller = caller  # who calls, when the transport says (SIP From user, carrier From)
        self.endpoint = endpoint
        self.prompt = prompt if prompt is not None else persona.prompt  # what the model is told
        self.variables: dict[str, str] = {}  # the per-call context the prompt was rendered with
        self.created = time.monotonic()
        self.answered_at: float | None = None
        self.placed_tick = 0  # engine tick at admission; answer latency in ticks is load-independent
        self.answer_ticks: int | None = None
        self.ended_at: float | None = None
        self.state = CallState.PREPARING
        self.end_reason: EndReason | None = None
        self.stats = CallStats()
        self.generation = 0
        self.slot: int | None = None
        self.live_frames = 0
        self.context_full = False  # reached the model's context (counted once)
        self.waited_ticks = 0  # consecutive ticks this call waited for its caller frame
        self.last_activity = time.monotonic()
        self.log = structlog.get_logger("agent.call").bind(call_id=self.call_id, persona=persona.id,
                                                           number=number, endpoint=endpoint)
        self._lock = threading.Lock()
        self._in = InboundAudio(ms_to_samples(max_latency_ms))
        self._out: collections.deque[OutFrame] = collections.deque()
        self._out_depth = outbound_depth
        self._seq = 0
        self._listeners: list[Callable[[CallEvent], None]] = []
        self.detector = BargeInDetector(barge_in)
        self.on_audio_in: Callable[["CallSession", np.ndarray], None] | None = None  # set by the scheduler (VAD)
        self.on_hangup: Callable[["CallSession", EndReason], None] | None = None  # set by the scheduler
        # (caller frame the model consumed or None, agent frame, text, index): engine thread
        self.recorder: Callable | None = None

    # -- endpoint side ------------------------------------------------------------------------
    def push_audio(self, pcm: np.ndarray) -> None:
        """Caller audio, 24 kHz mono float32, any length (endpoints resample at their edge)."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        with self._lock:
            dropped = self._in.push(pcm)
            self.last_activity = time.monotonic()
        if dropped:
            self.stats.caller_dropped_samples += dropped
        if self.on_audio_in is not None:
            self.on_audio_in(self, pcm)

    def pull_frame(self) -> OutFrame | None:
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

    def hangup(self, reason: EndReason = EndReason.CALLER_HANGUP) -> None:
        if self.on_hangup is not None and self.state is not CallState.ENDED:
            self.on_hangup(self, EndReason(reason))

    def dtmf(self, digit: str) -> None:
        self.emit(Dtmf(digit))

    # -- engine side --------------------------------------------------------------------------
    def emit(self, event: CallEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                self.log.exception("event_listener_failed", event=type(event).__name__)

    def set_state(self, state: CallState) -> None:
        self.state = state
        self.emit(StateChanged(state))

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
            self.emit(TextOut(text))

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
