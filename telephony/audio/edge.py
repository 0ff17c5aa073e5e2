"""Audio at the edge of the system: the one place where call audio is resampled.

Sessions speak 24 kHz mono float32 in 80 ms frames; endpoints speak their own rates and packet
sizes (WebRTC 48 kHz/20 ms, SIP 16 kHz/20 ms). `Capture` turns endpoint audio into session audio,
`Playout` turns session frames into endpoint packets. Both use stateful PyAV resamplers (no
clicks at packet boundaries). `Playout` never blocks: with nothing ready it returns silence and
counts an underrun, and after a barge-in it drops every sample of the older playout generation.
"""

from __future__ import annotations

import av
import numpy as np

from agent.calls.events import CallState
from agent.calls.session import CallSession
from agent.resample import Resampler
from agent.timebase import FRAME_MS, SAMPLE_RATE
from telephony.audio.codecs import int16_to_float


class FrameResampler:
    """Any av.AudioFrame (s16/flt, planar or not, stereo or mono, any rate) -> 24 kHz mono float32.

    What aiortc's decoders give (packed s16, mono or stereo: Opus at 48 kHz, G.711 at 8 kHz) is
    mixed down in numpy and resampled by `agent.resample` (about a third of PyAV's interpreter
    time per 20 ms packet); anything else goes through PyAV's resampler. Both mix down as the
    mean of the channels: a browser's mono voice arrives as two equal channels and keeps its
    level (libswresample's own stereo-to-mono mix adds 3 dB). A stream keeps to one path (its
    decoder's format does not change mid-call)."""

    def __init__(self, out_rate: int = SAMPLE_RATE):
        self.out_rate = out_rate
        self._av: av.AudioResampler | None = None
        self._np: Resampler | None = None

    def __call__(self, frame: av.AudioFrame) -> np.ndarray:
        if self._av is None and frame.format.name == "s16" and not frame.format.is_planar:
            if self._np is None or self._np.in_rate != frame.sample_rate:
                self._np = Resampler(frame.sample_rate, self.out_rate)
            channels = len(frame.layout.channels)
            s16 = frame.to_ndarray().reshape(-1, channels)
            mono = int16_to_float(s16[:, 0] if channels == 1 else s16.mean(axis=1, dtype=np.float32))
            return self._np(mono)
        if self._av is None:  # packed float in the frame's own layout: mixed down below, as above
            self._av = av.AudioResampler(format="flt", layout=frame.layout.name, rate=self.out_rate)
        frame.pts = None  # the resampler keeps its own continuous timeline
        out = [f.to_ndarray().reshape(-1, len(f.layout.channels)).mean(axis=1, dtype=np.float32)
               for f in self._av.resample(frame)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)


class Capture:
    """Caller audio from an endpoint into the session, resampled to 24 kHz once, statefully:
    float32 mono at the endpoint's rate (`push`), or decoded frames of any layout (`push_frame`)."""

    def __init__(self, session: CallSession, in_rate: int | None):
        self.session = session
        self.resample = Resampler(in_rate, SAMPLE_RATE) if in_rate else None
        self._frames: FrameResampler | None = None

    def push(self, pcm: np.ndarray) -> None:
        assert self.resample is not None, "this capture takes decoded frames (push_frame)"
        self._deliver(self.resample(pcm))

    def push_frame(self, frame: av.AudioFrame) -> None:
        if self._frames is None:
            self._frames = FrameResampler()
        self._deliver(self._frames(frame))

    def _deliver(self, pcm: np.ndarray) -> None:
        if len(pcm):
            self.session.push_audio(pcm)


class Playout:
    """Agent audio for one call at the endpoint's rate, one packet at a time."""

    def __init__(self, session: CallSession, rate: int, packet: int, on_underrun=None):
        self.session = session
        self.packet = packet
        self.resample = Resampler(SAMPLE_RATE, rate)
        self._buf = np.zeros(0, dtype=np.float32)
        self._gen = 0
        self._flushed = False  # a barge-in emptied the buffer; no frame of the new generation yet
        self.on_underrun = on_underrun  # (cause: "late" | "barge_in") -> None
        # Outbound alignment: each underrun (a late engine tick) would delay everything after
        # it by the silence played meanwhile; `_emit` trims such standing backlog.
        self._levels: list[int] = []
        self._window = max(2 * (rate * FRAME_MS // 1000) // packet, 4)  # two model frames of packets
        self.realigned = 0

    def _fill(self) -> None:
        sess = self.session
        if sess.generation != self._gen:  # barge-in: what is buffered is stale
            self._buf = np.zeros(0, dtype=np.float32)
            # ... and so is the resampler's filter history: kept, it would play the old turn's
            # last milliseconds at the start of the new one
            self.resample = Resampler(SAMPLE_RATE, self.resample.out_rate)
            self._gen = sess.generation
            self._flushed = True
        while True:  # take everything the session has: the backlog is then measurable here
            f = sess.pull_frame()
            if f is None:
                break
            if f.generation == sess.generation:
                self._buf = np.concatenate([self._buf, self.resample(f.pcm)])
                self._flushed = False

    def _emit(self) -> np.ndarray:
        out, self._buf = self._buf[: self.packet], self._buf[self.packet:]
        # Alignment: just after a frame arrives the buffer holds about a frame; just before
        # the next one, under a packet. If even the lowest level over a frame's worth of packets
        # stayed above a packet, that surplus is standing latency (late ticks, underruns):
        # drop it.
        self._levels.append(len(self._buf))
        if len(self._levels) >= self._window:
            low = min(self._levels)
            self._levels.clear()
            if low > self.packet:
                self._buf = self._buf[low - self.packet // 2:]
                self.realigned += 1
        return out

    def take_packet(self) -> np.ndarray | None:
        """A packet if one is ready, else None (for endpoints whose own clock plays silence)."""
        self._fill()
        if len(self._buf) < self.packet:
            return None
        return self._emit()

    def report_underrun(self) -> None:
        """Nothing to play: a late engine, or a barge-in that just flushed the agent's speech."""
        if self.session.state is CallState.LIVE:
            self.session.count_underrun(after_barge_in=self._flushed)
            if self.on_underrun is not None:
                self.on_underrun("barge_in" if self._flushed else "late")

    def next_packet(self) -> np.ndarray:
        """Always a packet: silence (counted as an underrun) when the agent has nothing ready."""
        self._fill()
        if len(self._buf) < self.packet:
            have = self._buf
            self._buf = np.zeros(0, dtype=np.float32)
            self.report_underrun()
            return np.concatenate([have, np.zeros(self.packet - len(have), np.float32)])
        return self._emit()
