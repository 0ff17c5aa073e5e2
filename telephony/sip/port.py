"""The per-call pjsua2 audio port: 16 kHz, 20 ms, 16-bit, on the conference bridge clock.

pjsua2 calls these two methods from the bridge's clock thread with the bridge lock held: a slow
callback would stall every call. So they only move bytes between deques; resampling, framing
and the session live on the SIP thread (`SipCall.pump`). A request always gets a full frame
(silence when nothing is ready), and packets from before a barge-in are dropped.
"""

from __future__ import annotations

import collections

import pjsua2 as pj

RATE = 16000
PTIME_US = 20000
SAMPLES = RATE * PTIME_US // 1_000_000  # 320
SILENCE = bytes(SAMPLES * 2)


class CallAudioPort(pj.AudioMediaPort):
    def __init__(self):
        super().__init__()
        self.inbound: collections.deque[bytes] = collections.deque(maxlen=50)  # 1 s: bounded
        self.outbound: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=10)
        self.generation = 0  # updated by the SIP thread on barge-in
        self.underruns = 0  # only ever grows, on the clock thread; the SIP thread reads differences
        self._silence = pj.ByteVector(SILENCE)

    def create(self, name: str) -> None:
        fmt = pj.MediaFormatAudio()
        fmt.init(pj.PJMEDIA_FORMAT_PCM, RATE, 1, PTIME_US, 16)
        self.createPort(name, fmt)

    def onFrameReceived(self, frame) -> None:  # caller -> us (clock thread)
        if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and frame.size:
            self.inbound.append(bytes(frame.buf))

    def onFrameRequested(self, frame) -> None:  # us -> caller (clock thread)
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        while self.outbound:
            gen, data = self.outbound.popleft()
            if gen == self.generation:
                frame.buf = pj.ByteVector(data)
                frame.size = len(data)
                return
        self.underruns += 1
        frame.buf = self._silence
        frame.size = len(SILENCE)
