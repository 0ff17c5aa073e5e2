"""The per-call pjsua2 audio port: 16 kHz, 20 ms, 16-bit, on the conference bridge clock.

pjsua2 calls these two methods from the bridge's clock thread with the bridge lock held: a slow
callback would stall every call. So they only move bytes between deques; resampling, framing
and the session live on the SIP thread (`SipCall.pump`). A request always gets a full frame
(silence when nothing is ready), and packets from before a barge-in are dropped.

Ports are pooled, never destroyed while the bridge runs: since pjproject 2.14 removing a port
from the conference bridge is queued to the clock thread, so a port freed at call end could
still be called back once more, into freed memory (a rare SIGSEGV after a call ended). A port
that served a call goes back to the pool and the next call reuses it; the pool is only as
large as the most calls ever up at once, and is freed after the clock has stopped.
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

    def reset(self) -> None:
        """Ready for the next call (SIP thread; the bridge may still call in, so only clear)."""
        self.inbound.clear()
        self.outbound.clear()
        self.generation = 0

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


class PortPool:
    """Call audio ports, reused across calls (see the module docstring for why)."""

    def __init__(self):
        self._free: list[CallAudioPort] = []
        self._all: list[CallAudioPort] = []

    def acquire(self) -> CallAudioPort:
        if self._free:
            port = self._free.pop()
            port.reset()
            return port
        port = CallAudioPort()
        port.create(f"agent{len(self._all)}")
        self._all.append(port)
        return port

    def release(self, port: CallAudioPort) -> None:
        port.reset()
        if port not in self._free:
            self._free.append(port)

    def destroy(self) -> None:
        """Only once nothing drives the bridge clock (the SIP endpoint's shutdown)."""
        self._free.clear()
        self._all.clear()
