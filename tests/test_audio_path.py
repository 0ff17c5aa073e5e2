"""The edge of the audio path: resampling, playout packets, barge-in drops, latency trimming."""

from __future__ import annotations

import numpy as np

from agent.barge_in import BargeInConfig
from agent.personas.schema import Persona
from agent.session import ALIGN_KEEP, ALIGN_MAX, ALIGN_WINDOW, FRAME, CallSession
from telephony.audio import Capture, Playout, Resampler

PERSONA = Persona(id="p", kind="prompt", numbers=("1",), voice="NATF0", prompt="Hi.", source="p.yaml")


def session(**kw) -> CallSession:
    s = CallSession(PERSONA, "1", "test", BargeInConfig(enabled=False), **kw)
    s.state = "live"
    return s


def test_resampler_is_stateful_and_keeps_duration():
    tone = np.sin(2 * np.pi * 440 * np.arange(48000) / 48000).astype(np.float32)
    r = Resampler(48000, 24000)
    out = np.concatenate([r(tone[i:i + 960]) for i in range(0, 48000, 960)])
    assert abs(len(out) - 24000) < 200
    # continuous across packet boundaries: no clicks (sample-to-sample steps stay small)
    assert np.abs(np.diff(out[100:-100])).max() < 0.2


def test_capture_feeds_the_session_at_24k():
    s = session()
    cap = Capture(s, 16000)
    for _ in range(20):
        cap.push(np.full(320, 0.1, np.float32))
    taken = [s.take_inbound() for _ in range(3)]
    assert all(t is not None and len(t) == FRAME for t in taken[:2])


def test_inbound_standing_backlog_is_trimmed_once():
    s = session()
    s.push_audio(np.zeros(1000, np.float32))  # a standing 1000-sample backlog (~42 ms)
    for _ in range(ALIGN_WINDOW + 2):
        s.push_audio(np.zeros(FRAME, np.float32))
        assert s.take_inbound() is not None
    assert s.stats.inbound_realigned == 1
    assert len(s._in) <= ALIGN_KEEP
    for _ in range(ALIGN_WINDOW * 2):  # in step now: no further trimming
        s.push_audio(np.zeros(FRAME, np.float32))
        s.take_inbound()
    assert s.stats.inbound_realigned == 1 and len(s._in) <= ALIGN_MAX


def test_playout_packets_underruns_and_barge_in():
    s = session()
    p = Playout(s, 48000, 960)
    assert not p.next_packet().any() and s.stats.playout_underruns == 1  # nothing yet: silence, counted
    s.deliver(np.full(FRAME, 0.5, np.float32), None, 0.0)
    pkts = [p.next_packet() for _ in range(4)]  # 80 ms at 48 kHz = 4 packets of 20 ms
    assert all(np.abs(x).max() > 0.3 for x in pkts[1:])
    s.deliver(np.full(FRAME, 0.5, np.float32), None, 0.1)
    p.next_packet()
    s.barge_in()  # what was queued or buffered before the barge-in never plays
    assert not p.next_packet().any()
    s.deliver(np.full(FRAME, 0.25, np.float32), None, 0.2)
    assert abs(np.abs(p.next_packet()[200:]).max() - 0.25) < 0.05


def test_playout_standing_backlog_is_trimmed():
    s = session(outbound_depth=4)
    p = Playout(s, 24000, 480)
    for _ in range(3):  # three frames arrive at once (a late tick caught up): 240 ms queued
        s.deliver(np.zeros(FRAME, np.float32), None, 0.0)
    levels = []
    for i in range(40):
        if i % 4 == 0:
            s.deliver(np.zeros(FRAME, np.float32), None, 0.0)
        p.take_packet()
        levels.append(len(p._buf))
    assert p.realigned >= 1
    assert max(levels[-8:]) <= FRAME  # back to at most a frame buffered
