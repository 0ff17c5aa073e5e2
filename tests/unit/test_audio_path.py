"""The edge of the audio path: resampling, inbound audio kept whole, playout packets, barge-in drops."""

from __future__ import annotations

import numpy as np

from agent.barge_in.detector import BargeInConfig
from agent.personas.schema import Persona
from agent.calls.events import CallState
from agent.resample import Resampler
from agent.calls.session import FRAME, CallSession, InboundAudio
from telephony.audio.edge import Capture, Playout

PERSONA = Persona(id="p", kind="prompt", numbers=("1",), voice="NATF0", prompt="Hi.", source="p.yaml")


def session(**kw) -> CallSession:
    s = CallSession(PERSONA, "1", "test", BargeInConfig(enabled=False), **kw)
    s.set_state(CallState.LIVE)
    return s


def test_resampler_is_stateful_and_keeps_duration():
    tone = np.sin(2 * np.pi * 440 * np.arange(48000) / 48000).astype(np.float32)
    r = Resampler(48000, 24000)
    out = np.concatenate([r(tone[i:i + 960]) for i in range(0, 48000, 960)])
    assert abs(len(out) - 24000) < 200
    # continuous across packet boundaries: no clicks (sample-to-sample steps stay small)
    assert np.abs(np.diff(out[100:-100])).max() < 0.2


def test_call_rate_ratios_take_the_polyphase_path_and_keep_tone_level_phase_and_length():
    """8/16/24/48 kHz: whatever the packet size, the same samples out (no state lost at packet
    boundaries), exactly up/down as many, a tone at its level, and what the lower rate cannot
    carry removed (no aliasing)."""
    for rin, rout in [(8000, 24000), (16000, 24000), (24000, 16000), (24000, 8000), (48000, 24000)]:
        r = Resampler(rin, rout)
        assert r._poly is not None
        tone = (0.5 * np.sin(2 * np.pi * 1000 * np.arange(rin) / rin)).astype(np.float32)
        whole = r(tone)
        r2 = Resampler(rin, rout)
        packets = np.concatenate([r2(tone[i:i + 7 * 48]) for i in range(0, rin, 7 * 48)])
        n = min(len(whole), len(packets))
        np.testing.assert_allclose(whole[:n], packets[:n], atol=1e-5)
        assert abs(len(packets) - rout) <= rout // rin + 1 and len(whole) == rout
        mid = whole[rout // 10:-rout // 10]
        assert abs(np.sqrt(2 * np.mean(mid ** 2)) - 0.5) < 0.005
        if rout < rin:  # a tone just above the new Nyquist frequency is gone
            high = (0.5 * np.sin(2 * np.pi * 0.6 * rout * np.arange(rin) / rin)).astype(np.float32)
            assert np.sqrt(np.mean(Resampler(rin, rout)(high)[rout // 10:] ** 2)) < 1e-3
    assert Resampler(44100, 24000)._poly is None  # any other ratio: libswresample


def test_decoded_frames_of_any_layout_become_the_same_24k_mono():
    """What aiortc's decoders give (packed s16: Opus stereo at 48 kHz, G.711 mono at 8 kHz) and
    anything else (planar float) arrive as 24 kHz mono at the tone's level (two equal channels:
    the mean, not libswresample's +3 dB mix) and length."""
    import av

    from telephony.audio.edge import FrameResampler

    def frames(rate: int, fmt: str, layout: str, ms: int = 20):
        n = rate * ms // 1000
        for k in range(50):
            t = (k * n + np.arange(n)) / rate
            tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
            chans = 2 if layout == "stereo" else 1
            if fmt == "s16":
                data = np.repeat(np.round(tone * 32767).astype(np.int16), chans)[None, :]
            else:  # planar float
                data = np.tile(tone.astype(np.float32), (chans, 1))
            f = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
            f.sample_rate = rate
            yield f

    for rate, fmt, layout, fast in [(48000, "s16", "stereo", True), (8000, "s16", "mono", True),
                                    (48000, "fltp", "stereo", False), (44100, "s16", "stereo", True),
                                    (44100, "fltp", "mono", False)]:
        r = FrameResampler()
        out = np.concatenate([r(f) for f in frames(rate, fmt, layout)])
        assert (r._np is not None) == fast and (r._av is None) == fast, (rate, fmt, layout)
        assert abs(len(out) - 24000) <= 1200, (rate, fmt, len(out))  # 1 s, give or take a filter's delay
        mid = out[2400:-2400]
        assert abs(np.sqrt(2 * np.mean(mid ** 2)) - 0.5) < 0.01, (rate, fmt, layout)
        spectrum = np.abs(np.fft.rfft(mid))
        assert abs(np.argmax(spectrum) * 24000 / len(mid) - 1000) < 5


def test_capture_feeds_the_session_at_24k():
    s = session()
    cap = Capture(s, 16000)
    for _ in range(20):
        cap.push(np.full(320, 0.1, np.float32))
    taken = [s.take_inbound() for _ in range(3)]
    assert all(t is not None and len(t) == FRAME for t in taken[:2])


def test_inbound_audio_is_kept_whole_and_in_order_up_to_the_latency_bound():
    s = session(max_latency_ms=400)  # 9600 samples
    sig = np.arange(1, 8001, dtype=np.float32)
    for i in range(0, len(sig), 480):  # 20 ms packets, nothing consumed yet
        s.push_audio(sig[i:i + 480])
    got = [s.take_inbound() for _ in range(4)]
    assert s.take_inbound() is None  # a partial frame waits for the rest of it
    np.testing.assert_array_equal(np.concatenate(got), sig[: 4 * FRAME])
    assert s.inbound_samples == len(sig) - 4 * FRAME and s.stats.caller_dropped_samples == 0
    s.push_audio(np.arange(8001, 8001 + 9600, dtype=np.float32))  # past the bound: the oldest go
    waiting = len(sig) - 4 * FRAME  # 320 samples were waiting; 9600 more make 9920: 320 too many
    assert s.inbound_samples == 9600 and s.stats.caller_dropped_samples == waiting
    assert s.take_inbound()[0] == 8001  # the oldest went, the newest stayed


def test_caller_audio_from_before_the_answer_is_kept_and_caught_up_without_loss():
    """A carrier streams the caller from its `start`, while the prompt is prefilled: what arrives
    before the call is live is kept, and once live it is an allowance over the latency bound that
    shrinks as the engine consumes it; audio arriving after that is bounded as usual."""
    s = CallSession(PERSONA, "1", "test", BargeInConfig(enabled=False), max_latency_ms=400)
    sig = np.arange(1, 24001, dtype=np.float32)  # 1 s before the answer: 2.5 x the bound
    for i in range(0, len(sig), 480):
        s.push_audio(sig[i:i + 480])
    s.set_state(CallState.LIVE)
    s.push_audio(np.zeros(480, np.float32))  # live now, the backlog stays
    assert s.stats.caller_dropped_samples == 0 and s.inbound_samples == 24480
    got = [s.take_inbound() for _ in range(12)]  # the engine catches up (extra steps)
    np.testing.assert_array_equal(np.concatenate(got), sig[: 12 * FRAME])  # every sample, in order
    s.push_audio(np.zeros(2 * 9600, np.float32))  # caught up: the usual bound again (plus what is left)
    assert s.stats.caller_dropped_samples > 0 and s.inbound_samples < 9600 + FRAME


def test_inbound_bound_counts_every_dropped_sample():
    buf = InboundAudio(4000)
    assert buf.push(np.zeros(3000, np.float32)) == 0
    assert buf.push(np.ones(2500, np.float32)) == 1500
    assert len(buf) == 4000 and buf.take(1500).sum() == 0 and buf.take(2500).sum() == 2500


def test_playout_packets_underruns_and_barge_in():
    s = session()
    causes = []
    p = Playout(s, 48000, 960, on_underrun=causes.append)
    assert not p.next_packet().any() and s.stats.playout_underruns == 1  # nothing yet: silence, counted
    s.deliver(np.full(FRAME, 0.5, np.float32), None, 0.0)
    pkts = [p.next_packet() for _ in range(4)]  # 80 ms at 48 kHz = 4 packets of 20 ms
    assert all(np.abs(x).max() > 0.3 for x in pkts[1:])
    s.deliver(np.full(FRAME, 0.5, np.float32), None, 0.1)
    p.next_packet()
    s.barge_in()  # what was queued or buffered before the barge-in never plays
    assert not p.next_packet().any()
    # that silence is the barge-in's doing, not a late engine: counted apart
    assert causes[-1] == "barge_in" and causes.count("barge_in") == 1
    assert s.stats.underruns_after_barge_in == 1 and s.stats.playout_underruns == len(causes) - 1
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


def test_a_new_turn_after_a_barge_in_starts_without_the_old_turns_tail():
    """The resampler's filter holds the last milliseconds it was given: after a barge-in those
    belong to the interrupted turn and must not open the next one."""
    s = session()
    p = Playout(s, 8000, 160)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(FRAME) / 24000)).astype(np.float32)
    s.deliver(tone, None, 0.0)
    p.next_packet()
    s.barge_in()
    assert not p.next_packet().any()
    s.deliver(np.zeros(FRAME, np.float32), None, 0.1)  # the new turn opens with silence
    first = p.next_packet()
    assert np.abs(first).max() < 1e-3, np.abs(first).max()
