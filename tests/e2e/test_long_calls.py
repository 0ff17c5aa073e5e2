"""Calls of any length (engine.context_policy: reprime) through the real server and real SIP.

The server runs the demo model with a 256-frame (20 s) context, so a call crosses it every few
seconds. Two sipp callers talk at once for 32 s, each streaming a known noise signal: every call
is re-primed at least three times, stays up until the caller's BYE, and its call record's caller
channel is that signal whole and in order (one delay from start to end but for single 20 ms
packets pjmedia's jitter buffer conceals or drops: a model frame lost or repeated at a rebuild
moves it by 80 ms); the agent's audio never stops at a re-prime.
"""

from __future__ import annotations

import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.support import machine_cannot, poll, require, rtp_ports
from tests.support.models import small_context_dir
from tests.support.server import ServerProcess, ended, metric
from tests.support.sip_trace import Sipp

SCENARIOS = Path(__file__).parent / "sipp"
CONTEXT = 256
CALLS = 2
PACKET_8K = 160  # one 20 ms RTP packet at 8 kHz
TALK_S = 32
PERSONA = 'kind: prompt\nnumbers: ["1099"]\nvoice: NATF0\nprompt: "Hello."\n'


@pytest.fixture(scope="module")
def long_server(tmp_path_factory, demo_dir):
    for c in ("pjsua2", "sipp", "sox"):
        require(c)
    tmp = tmp_path_factory.mktemp("longcalls")
    model = small_context_dir(demo_dir, tmp / "ctx256", CONTEXT)
    (tmp / "personas").mkdir()
    (tmp / "personas" / "longcall.yaml").write_text(PERSONA)
    srv = ServerProcess(tmp, demo_dir.parent, {
        "model": {"source": "dir", "dir": str(model)},
        "engine": {"max_calls": CALLS, "context_policy": "reprime"},
        "personas": {"unknown_numbers": "refuse"},
        "sip": {"enabled": True, "rtp_port": rtp_ports()},
        "recording": {"enabled": True, "dir": str(tmp / "rec"), "max_files": 20},
    })
    srv.rec = tmp / "rec"
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def noise_ulaw(path: Path, seconds: float, seed: int) -> np.ndarray:
    """Band-limited noise with a slow loudness swell, 8 kHz, as u-law for sipp's RTP stream; returns
    the 16-bit signal (float) that was encoded."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 8000)
    x = rng.standard_normal(n)
    x = np.convolve(x, np.hanning(5) / np.hanning(5).sum(), mode="same")  # below ~2 kHz
    x *= 0.5 + 0.4 * np.sin(np.arange(n) / 8000 * 2 * np.pi * 0.7)
    x = np.clip(x * 0.25, -0.9, 0.9)
    pcm16 = path.with_suffix(".s16.wav")
    with wave.open(str(pcm16), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    subprocess.run(["sox", str(pcm16), "-r", "8000", "-c", "1", "-e", "u-law", str(path)], check=True)
    return x


def read_record(rec: Path, call_id: str) -> tuple[dict, np.ndarray, np.ndarray]:
    import json

    import sphn

    paths = poll(lambda: list(rec.glob(f"*-{call_id}.json")), bool, 15)
    assert paths, sorted(p.name for p in rec.glob("*"))
    meta = json.loads(paths[0].read_text())
    pcm, sr = sphn.read(str(paths[0].with_suffix(".wav")))
    assert sr == 24000 and pcm.shape[0] == 2
    return meta, pcm[0], pcm[1]


def delays(sent: np.ndarray, got: np.ndarray, window: int = 8000, search: int = 40,
           cut: int = 0) -> tuple[int, list[int]]:
    """The delay of `got` against `sent` (8 kHz): overall, then per `window`, searched within
    `search` samples of the overall one, widened by `cut` either way (audio cut from the caller's
    stream makes what follows lead by as much). A frame lost or repeated anywhere moves it by 160+."""
    from scipy.signal import correlate

    n = len(got)
    spec = np.fft.rfft(got, 2 * n) * np.conj(np.fft.rfft(sent[:n], 2 * n))
    xc = np.fft.irfft(spec)
    overall = int(np.argmax(xc[:n // 2]))  # got lags sent (the caller's audio before the answer is not kept)
    lo, hi = overall - search - cut, overall + search + cut
    out = []
    for start in range(window // 2, n - window - search, window):
        seg = got[start:start + window]
        a = start - hi  # sent[start - d : start - d + window] for d from hi down to lo
        region = sent[max(0, a): start - lo + window]
        scores = correlate(region, seg, mode="valid", method="fft")
        out.append(start - (max(0, a) + int(np.argmax(scores))))
    return overall, out


@pytest.mark.slow
def test_calls_cross_the_context_three_times_and_stay_whole(long_server, tmp_path):
    from scipy.signal import resample_poly

    srv = long_server
    sent = noise_ulaw(tmp_path / "caller.wav", TALK_S + 8, seed=11)
    before = ended(srv)
    reprimes_before = metric(srv, 'personaplex_reprimes_total{swap="quiet"}') + \
        metric(srv, 'personaplex_reprimes_total{swap="deadline"}')
    sipp = Sipp(srv.sip_port, SCENARIOS / "uac_call.xml", "1099", tmp_path,
                {"@RTP_FILE@": str(tmp_path / "caller.wav"), 'milliseconds="4000"': f'milliseconds="{TALK_S * 1000}"'},
                timeout=TALK_S + 30, calls=CALLS)
    rc, trace = sipp.start().wait()
    assert rc == 0, (sipp.output[-2000:], trace[-3000:])
    ends = poll(lambda: [ln for ln in srv.lines() if ln.get("event") == "call_end" and ln["call_id"] not in before],
                lambda e: len(e) >= CALLS, 15)
    assert len(ends) == CALLS
    rebuilt = 0
    starved: list[dict] = []  # calls whose port the overloaded engine starved of agent audio
    for end in ends:
        # up to the caller's BYE, however often its context was rebuilt
        assert end["reason"] == "caller_hangup", end
        assert len(end["reprimes"]) >= 3, end["reprimes"]
        # nothing lost to a rebuild: at most what the latency bound cuts once while the call starts
        # (its first RTP arrives during the prompt's prefill on these CPUs); the caller channel
        # below is one constant delay from there on, across every rebuild
        if end["caller_audio_dropped_s"] > 0.4 and end["engine_overruns"] > 0.1 * end["frames_in"]:
            machine_cannot(f"the engine overran {end['engine_overruns']} of {end['frames_in']} ticks with "
                           f"{CALLS} calls: slower than real time here, the latency bound cut "
                           f"{end['caller_audio_dropped_s']} s (counted); a re-prime's losses cannot be told apart")
        assert end["caller_audio_dropped_s"] <= 0.4, end
        rebuilt += len(end["reprimes"])
        meta, caller, agent = read_record(srv.rec, end["call_id"])
        assert meta["reprimes"] == end["reprimes"]
        assert meta["duration_s"] > TALK_S - 3
        # the caller channel: the signal sipp sent, whole and in order
        got = resample_poly(caller, 1, 3)
        # The delay is constant but for steps of at most one 20 ms packet: pjmedia's jitter
        # buffer conceals a packet when the bridge clock finds it empty and later drops one
        # (seen around rebuilds, whose prefill competes with the SIP thread: +160 then -80
        # samples, nothing counted; a media-plane matter, see the README's known limits). A
        # rebuild that lost or repeated a model frame moves it by 640. On a machine slower than
        # real time (over a tenth of the ticks overran) the latency bound may also cut anywhere
        # in the call (counted): the delay then steps down by up to what was cut.
        overloaded = end["engine_overruns"] > 0.1 * end["frames_in"]
        cut = round(end["caller_audio_dropped_s"] * 8000) if overloaded else 0
        overall, local = delays(sent, got, search=40 + 2 * PACKET_8K, cut=cut)
        assert len(local) >= TALK_S - 6
        steps = np.diff(local)
        assert all(-max(cut, PACKET_8K) - 2 <= d <= PACKET_8K + 2 for d in steps), (overall, cut, local)
        assert abs(local[-1] - local[0]) <= cut + 2 * PACKET_8K + 4, (overall, cut, local)
        # the agent's audio never stops at a re-prime: every frame from the first on is sound
        frames = agent[: len(agent) // 1920 * 1920].reshape(-1, 1920)
        rms = np.sqrt((frames ** 2).mean(axis=1))
        for r in meta["reprimes"]:
            around = rms[max(1, r["frame"] - 3): r["frame"] + 3]
            assert (around > 1e-4).all(), (r, around)
        # what the caller heard: the port was fed every 20 ms but for a handful of packets
        # (on a machine slower than real time the engine's late ticks starve the port: said below)
        if end["playout_underruns"] > 0.02 * end["frames_out"] * 4:
            assert overloaded, end
            starved.append(end)
    lines = [ln for ln in srv.lines() if ln.get("event") == "reprime"]
    assert len(lines) >= rebuilt
    line = lines[-1]
    for key in ("call_id", "position", "window_frames", "build_ms", "chunks", "caught_up_frames", "swap"):
        assert key in line, line
    after = metric(srv, 'personaplex_reprimes_total{swap="quiet"}') + \
        metric(srv, 'personaplex_reprimes_total{swap="deadline"}')
    assert after - reprimes_before == rebuilt
    assert metric(srv, "personaplex_reprime_build_seconds_count") >= rebuilt
    if starved:
        machine_cannot(f"the engine overran {starved[0]['engine_overruns']} of {starved[0]['frames_in']} ticks with "
                       f"{CALLS} calls: the port went without agent audio for "
                       f"{starved[0]['playout_underruns']} of {4 * starved[0]['frames_out']} packets")
