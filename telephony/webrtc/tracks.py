"""The agent's voice as an aiortc audio track: 20 ms packets at 48 kHz, paced in real time."""

from __future__ import annotations

import fractions

import av
import numpy as np
from aiortc import MediaStreamTrack

from telephony.audio.edge import Playout
from telephony.audio.pacer import Pacer

RATE = 48000
PACKET = 960  # 20 ms


class AgentAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, playout: Playout):
        super().__init__()
        self.playout = playout
        self._pacer = Pacer(PACKET / RATE)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            from aiortc.mediastreams import MediaStreamError

            raise MediaStreamError
        pts = await self._pacer.wait() * PACKET  # continuous through a stall (re-anchored, no burst)
        pcm = self.playout.next_packet()
        s16 = (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(s16[None, :], format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, RATE)
        return frame
