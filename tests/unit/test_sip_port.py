"""The SIP call port's bridge callbacks: bytes in and out whole, overruns and underruns counted."""

from __future__ import annotations

import pjsua2 as pj

from telephony.sip.port import SILENCE, CallAudioPort


def frame(data: bytes = b"") -> pj.MediaFrame:
    f = pj.MediaFrame()
    f.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
    f.buf = pj.ByteVector(data)
    f.size = len(data)
    return f


def test_caller_packets_are_copied_whole_and_a_full_queue_counts_overruns():
    port = CallAudioPort()
    pkts = [bytes([i]) * 640 for i in range(60)]
    for p in pkts:
        port.onFrameReceived(frame(p))
    assert [bytes(b) for b in port.inbound] == pkts[-50:]  # the newest second, byte for byte
    assert port.overruns == 10  # every packet pushed out of the full queue was counted


def test_agent_packets_go_out_whole_older_generations_dropped_silence_counted():
    port = CallAudioPort()
    port.outbound.append((0, b"\x01" * 640))
    port.outbound.append((1, b"\x02" * 640))
    port.generation = 1
    f = frame(b"\x09" * 640)
    port.onFrameRequested(f)
    assert bytes(f.buf) == b"\x02" * 640 and f.size == 640 and port.underruns == 0
    port.onFrameRequested(f)
    assert bytes(f.buf) == SILENCE and f.size == len(SILENCE) and port.underruns == 1
