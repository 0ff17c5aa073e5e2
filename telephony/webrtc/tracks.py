"""The agent's voice as an aiortc audio track: 20 ms packets at 48 kHz, paced in real time."""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
from aiortc import MediaStreamTrack

from telephony.audio import Playout

RATE = 48000
PACKET = 960  # 20 ms


class AgentAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, playout: Playout):
        super().__init__()
        self.playout = playout
        self._start: float | None = None
        self._pts = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            from aiortc.mediastreams import MediaStreamError

            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            self._pts += PACKET
            wait = self._start + self._pts / RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.2:  # the loop stalled: restart the clock rather than burst audio
                self._start = time.monotonic() - self._pts / RATE
        pcm = self.playout.next_packet()
        s16 = (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(s16[None, :], format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, RATE)
        return frame
