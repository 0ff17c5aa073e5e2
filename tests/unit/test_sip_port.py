"""The SIP call port (native rings on pjsua's real conference bridge, its clock the null sound
device): samples cross the bridge whole, a port with nothing queued sends silence and counts an
underrun, a full inbound ring keeps the newest second and counts what it pushed out, a barge-in
drops what was queued, and the tap sees the change from loud to quiet as the clock sends it."""

from __future__ import annotations

import time

import numpy as np
import pjsua2 as pj
import pytest

from telephony.sip.port import PortPool, bridge_rate

RATE = 16000
SAMPLES = 320
IN_CAPACITY = RATE  # a second


@pytest.fixture(scope="module")
def bridge():
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.logConfig.level = cfg.logConfig.consoleLevel = 0
    cfg.medConfig.clockRate = cfg.medConfig.sndClockRate = RATE
    cfg.medConfig.channelCount = 1
    cfg.medConfig.noVad = True
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()  # the bridge's clock: 20 ms frames on pjmedia's own thread
    ep.libStart()
    pool = PortPool(RATE)
    a, b = pool.acquire(), pool.acquire()
    a.connect(b.slot)  # a -> b and b -> a, as a call's stream and its port
    yield pool, a, b
    ep.audDevManager().setNoDev()
    ep.libDestroy()
    pool.destroy()


def wait_for(cond, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "the bridge clock did not move"
        time.sleep(0.01)


def drain(port, seconds: float) -> np.ndarray:
    got, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        pcm = port.read()
        if pcm is not None:
            got.append(pcm)
        time.sleep(0.005)
    return np.concatenate(got) if got else np.zeros(0, np.float32)


def test_samples_cross_the_bridge_whole_and_silence_counts_underruns(bridge):
    _, a, b = bridge
    a.reset(), b.reset()
    under0 = a.counters()[0]
    ramp = (np.arange(10 * SAMPLES) % 200 - 100).astype(np.float32) / 128.0
    assert a.write(ramp) == len(ramp)
    heard = drain(b, 0.5)
    loud = np.flatnonzero(np.abs(heard) > 0)
    assert len(loud), "nothing arrived"
    got = heard[loud[0]:loud[0] + len(ramp)]
    want = (np.clip(ramp, -1, 1) * 32767).astype("<i2") / 32768.0
    np.testing.assert_allclose(got, want, atol=1.5 / 32768)  # sample for sample, in order
    assert a.queued() == 0
    assert a.counters()[0] > under0  # after the ramp it had nothing: silence, counted


def test_a_full_caller_ring_keeps_the_newest_second_and_counts_the_rest(bridge):
    _, a, b = bridge
    a.reset(), b.reset()
    _, over0, frames0 = b.counters()
    wait_for(lambda: b.counters()[2] - frames0 >= 1.3 * RATE // SAMPLES)  # 1.3 s of frames, none read
    _, over, _ = b.counters()
    assert over - over0 >= RATE * 0.25  # what the ring could not hold: pushed out, counted in samples
    assert len(b.read()) == IN_CAPACITY


def test_a_barge_in_drops_what_is_queued_and_the_tap_sees_it_go_quiet(bridge):
    _, a, b = bridge
    a.reset(), b.reset()
    a.tap(0.05)
    tone = 0.5 * np.sin(np.arange(RATE // 4) * 2 * np.pi * 440 / RATE).astype(np.float32)
    a.write(tone)
    wait_for(lambda: a.queued() < len(tone) - 2 * SAMPLES)
    t_drop = time.time()
    queued = a.queued()
    dropped = a.drop_agent_audio()
    assert a.queued() == 0
    assert 0 < dropped <= queued  # what it dropped, for the call's barge_in_flushed_s
    time.sleep(0.1)
    events = a.tap_events()
    assert [loud for loud, _ in events][-2:] == [True, False]
    assert 0 <= events[-1][1] - t_drop < 0.05  # quiet from the next frame the clock sends
    a.tap(0)


def test_the_bridge_runs_at_the_rate_of_the_codecs_offered():
    assert bridge_rate(["opus/48000", "G722/16000", "PCMU/8000", "PCMA/8000"]) == 16000  # the default list
    assert bridge_rate(["PCMU/8000", "PCMA/8000"]) == 8000  # G.711 only: nothing to resample
    assert bridge_rate(["G722/16000"]) == 16000
    assert bridge_rate(["opus/48000"]) == 16000  # never above 16 kHz
    assert bridge_rate(["PCMU"]) == 16000  # no rate given: the wideband default
