"""The per-call pjsua2 audio port: 16 kHz, 20 ms, 16-bit, on the conference bridge clock.

pjsua2 calls these two methods from the bridge's clock thread with the bridge lock held: a slow
callback would stall every call. So they only move bytes between deques; resampling, framing
and the session live on the SIP thread (`SipCall.pump`). The bytes cross SWIG's `ByteVector`
in one copy each way (`copy_to_bytearray`, `assign_from_bytes`): iterating the vector from
Python, as `bytes(frame.buf)` and `ByteVector(data)` do, costs about 0.5 ms per 20 ms packet,
which alone was most of the clock thread's time per call. A request always gets a full frame
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


#: pjsua2 builds whose ByteVector has the one-copy helpers (pjproject 2.14 and later do)
ONE_COPY = hasattr(pj.ByteVector, "copy_to_bytearray") and hasattr(pj.ByteVector, "assign_from_bytes")


class CallAudioPort(pj.AudioMediaPort):
    def __init__(self):
        super().__init__()
        self.inbound: collections.deque[bytes] = collections.deque(maxlen=50)  # 1 s: bounded
        self.outbound: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=10)
        self.generation = 0  # updated by the SIP thread on barge-in
        self.underruns = 0  # only ever grows, on the clock thread; the SIP thread reads differences
        self.overruns = 0  # caller frames pushed out of the full inbound queue (same rule)
        self._silence = pj.ByteVector(SILENCE) if not ONE_COPY else None

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
            if len(self.inbound) == self.inbound.maxlen:  # the SIP thread fell a second behind
                self.overruns += 1
            buf = frame.buf
            if ONE_COPY:
                data = bytearray(buf.size())  # copy_to_bytearray needs room for the whole vector
                buf.copy_to_bytearray(data)
            else:
                data = bytes(buf)
            self.inbound.append(data)

    def onFrameRequested(self, frame) -> None:  # us -> caller (clock thread)
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        while self.outbound:
            gen, data = self.outbound.popleft()
            if gen == self.generation:
                self._put(frame, data)
                return
        self.underruns += 1
        self._put(frame, SILENCE)

    def _put(self, frame, data: bytes) -> None:
        if ONE_COPY:
            frame.buf.assign_from_bytes(data)
        else:
            frame.buf = self._silence if data is SILENCE else pj.ByteVector(data)
        frame.size = len(data)


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
