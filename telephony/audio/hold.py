"""What a caller on hold hears: a file looped, or a soft built-in chime.

The source is decoded once at start (24 kHz mono, `agent.audio_io`) and shared; each held call
has its own cursor (`HoldPlayer`) at its transport's rate and packet size, so a caller hears the
hold audio from its start, whoever else is waiting.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.timebase import SAMPLE_RATE

CHIME_PERIOD_S = 4.0
CHIME_LEVEL = 0.08  # about -22 dBFS: audible, never startling


def builtin_chime() -> np.ndarray:
    """Two soft notes with gentle fades, then quiet, every few seconds: tells the caller the
    line is alive without pretending to be a ringback or busy tone."""
    t = np.arange(int(0.45 * SAMPLE_RATE)) / SAMPLE_RATE
    env = np.sin(np.pi * t / t[-1]) ** 2  # smooth in and out: no clicks
    notes = [CHIME_LEVEL * env * np.sin(2 * np.pi * f * t) for f in (523.25, 659.25)]
    out = np.zeros(int(CHIME_PERIOD_S * SAMPLE_RATE), dtype=np.float32)
    out[:len(t)] += notes[0]
    out[len(t):2 * len(t)] += notes[1]
    return out


class HoldAudio:
    """The shared hold source (24 kHz mono float32)."""

    def __init__(self, pcm: np.ndarray):
        if pcm.size == 0:
            raise ValueError("hold audio is empty")
        self.pcm = pcm.astype(np.float32)

    @classmethod
    def load(cls, path: Path | None) -> "HoldAudio":
        """From a wav/ogg file (any rate; mixed to mono), or the built-in chime without one."""
        if path is None:
            return cls(builtin_chime())
        from agent.audio_io import read_audio

        return cls(read_audio(path, SAMPLE_RATE))

    def player(self, rate: int, packet: int) -> "HoldPlayer":
        return HoldPlayer(self, rate, packet)


class HoldPlayer:
    """One held call's position in the hold audio, as packets at the transport's rate."""

    def __init__(self, source: HoldAudio, rate: int, packet: int):
        pcm = source.pcm
        if rate != SAMPLE_RATE:
            import sphn

            n_out = int(round(len(pcm) * rate / SAMPLE_RATE))
            pcm = sphn.resample(pcm[None], src_sample_rate=SAMPLE_RATE, dst_sample_rate=rate)[0, :n_out]
        self.pcm = np.asarray(pcm, dtype=np.float32)
        self.packet = packet
        self.pos = 0

    def take_packet(self) -> np.ndarray:
        n, out, filled = self.packet, np.empty(self.packet, dtype=np.float32), 0
        while filled < n:
            chunk = self.pcm[self.pos:self.pos + n - filled]
            out[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
            self.pos = (self.pos + len(chunk)) % len(self.pcm)
        return out
