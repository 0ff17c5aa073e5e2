#!/usr/bin/env python3
"""Latency the transport path adds, with the model replaced by a pass-through (benchmark only).

For WebRTC (aiortc caller), SIP (pjsua2 caller) and Twilio Media Streams (a Twilio-speaking
WebSocket caller) it sends tone bursts, echoes the caller's audio straight back through the real
endpoint, leg, session, scheduler and playout code (tests/support/fake_server.py, echo mode), and
timestamps each burst where the caller's audio enters the shared call leg (decoded, before
resampling) and where the agent's packet leaves the transport (before encoding). Prints median /
p90 / max over the bursts. Target: at most one model frame (80 ms) + 20 ms.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

BURST_EVERY_S = 0.5
INS: list[tuple[float, np.ndarray]] = []
OUTS: list[tuple[float, np.ndarray]] = []


def bursts(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = np.zeros_like(t, dtype=np.float32)
    for k in range(1, int(seconds / BURST_EVERY_S)):
        s = int(k * BURST_EVERY_S * rate)
        n = int(0.01 * rate)
        x[s:s + n] = 0.8 * np.sin(2 * np.pi * 1000 * t[:n])
    return x


def onsets(events: list[tuple[float, np.ndarray]], thr: float = 0.3, gap_s: float = 0.25) -> list[float]:
    """Times of the packets in which the signal first exceeds thr after a quiet gap."""
    out, last = [], -1e9
    for t, pcm in events:
        if len(pcm) and np.abs(pcm).max() > thr:
            if t - last > gap_s:
                out.append(t)
            last = t
    return out


def install_taps() -> None:
    """Caller audio where it enters the shared leg; agent audio where each transport sends it."""
    import telephony.leg as leg
    import telephony.streams.base as ms
    import telephony.sip.call as sipcall
    import telephony.webrtc.tracks as tracks

    real_in, real_frame_in = leg.CallLeg.audio_in, leg.CallLeg.frame_in

    def audio_in(self, pcm):
        INS.append((time.monotonic(), np.asarray(pcm)))
        return real_in(self, pcm)

    def frame_in(self, frame):
        INS.append((time.monotonic(), frame.to_ndarray().reshape(-1) / 32768.0))
        return real_frame_in(self, frame)
    leg.CallLeg.audio_in, leg.CallLeg.frame_in = audio_in, frame_in
    real_next = tracks.AgentAudioTrack.next_pcm

    async def next_pcm(self):
        pts, pcm = await real_next(self)
        OUTS.append((time.monotonic(), pcm))
        return pts, pcm
    tracks.AgentAudioTrack.next_pcm = next_pcm
    real_pump = sipcall.SipCall.pump
    loud = np.ones(1, dtype=np.float32)
    wall_to_mono = time.monotonic() - time.time()

    def pump(self):  # the SIP port's tap: when what the bridge clock sent turned loud
        real_pump(self)
        port = self.port
        if port is None:
            return
        if not getattr(port, "tapped", False):
            port.tap(0.1)
            port.tapped = True
        OUTS.extend((t + wall_to_mono, loud) for is_loud, t in port.tap_events() if is_loud)
    sipcall.SipCall.pump = pump
    real_encode = ms.StreamLeg.__init__

    def init(self, *a, **kw):
        real_encode(self, *a, **kw)
        encode = self.proto.encode_media

        def tapped(pcm):
            OUTS.append((time.monotonic(), np.asarray(pcm)))
            return encode(pcm)
        self.proto.encode_media = tapped
    ms.StreamLeg.__init__ = init


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_runtime(http_port: int, sip_port: int | None = None):
    from server.config import ServerConfig
    from server.runtime import Runtime
    from tests.support.fake_server import scripted

    cfg = ServerConfig.model_validate({
        "model": {"source": "demo", "device": "cpu"}, "personas": {"dir": str(ROOT / "personas")},
        "engine": {"max_calls": 2, "barge_in": {"enabled": False}},
        "http": {"host": "127.0.0.1", "port": http_port},
        "sip": {"enabled": sip_port is not None, "port": sip_port or 5060, "rtp_port": 23000},
        "twilio": {"enabled": True, "allow_unsigned": True}, "logging": {"format": "json", "level": "warning"}})
    rt = Runtime(cfg)
    rt.on_warm.append(lambda r: scripted(r.scheduler, "echo"))
    return rt


def report(name: str, ins: list[float], outs: list[float]) -> None:
    lat = []
    j = 0
    for t_in in ins:
        while j < len(outs) and outs[j] < t_in:
            j += 1
        if j < len(outs) and outs[j] - t_in < 1.0:
            lat.append(1000 * (outs[j] - t_in))
            j += 1
    if not lat:
        print(f"{name}: no bursts matched ({len(ins)} in, {len(outs)} out)")
        return
    lat.sort()
    print(f"{name}: {len(lat)} bursts, median {statistics.median(lat):.1f} ms, "
          f"p90 {lat[int(0.9 * (len(lat) - 1))]:.1f} ms, max {lat[-1]:.1f} ms  (target <= 100 ms)", flush=True)


async def bench_webrtc(seconds: float) -> None:
    import sphn

    from tests.support.webrtc_client import WebRtcCaller

    INS.clear()
    OUTS.clear()
    port = free_port()
    rt = make_runtime(port)
    await rt.start()
    with tempfile.TemporaryDirectory() as d:
        wav = os.path.join(d, "bursts.wav")
        sphn.write_wav(wav, bursts(48000, seconds), 48000)
        caller = WebRtcCaller(f"http://127.0.0.1:{port}", "citysan", wav)
        assert await caller.call() == 200
        await asyncio.sleep(seconds + 1)
        await caller.hangup()
    await rt.drain_and_stop()
    report("WebRTC path (decoded caller packet in -> agent packet out)", onsets(INS), onsets(OUTS))


async def bench_twilio(seconds: float) -> None:
    from tests.support.carriers import TwilioCaller

    INS.clear()
    OUTS.clear()
    port = free_port()
    rt = make_runtime(port)
    await rt.start()
    caller = TwilioCaller(f"ws://127.0.0.1:{port}/twilio/media", parameters={"to": "1001"},
                          wav_or_pcm=bursts(8000, seconds))
    await caller.run(seconds + 0.5)
    await rt.drain_and_stop()
    report("Twilio path (decoded media frame in -> media frame out, u-law 8 kHz)", onsets(INS), onsets(OUTS))


def bench_sip(seconds: float) -> None:
    import sphn

    try:
        import pjsua2  # noqa: F401
    except ImportError:
        print("SIP: pjsua2 not installed (scripts/build_pjsua2.sh); skipped")
        return
    INS.clear()
    OUTS.clear()
    sip_port, http_port = free_port(socket.SOCK_DGRAM), free_port()
    loop = asyncio.new_event_loop()
    rt = make_runtime(http_port, sip_port)
    loop.run_until_complete(rt.start())
    threading.Thread(target=loop.run_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as d:
        wav = os.path.join(d, "bursts16.wav")
        sphn.write_wav(wav, bursts(16000, seconds), 16000)
        subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "sip_client.py"),
                        f"sip:1001@127.0.0.1:{sip_port}", wav, os.path.join(d, "heard.wav"),
                        "--seconds", str(seconds), "--codec", "PCMU"], capture_output=True, timeout=seconds + 60)
    asyncio.run_coroutine_threadsafe(rt.drain_and_stop(), loop).result(30)
    report("SIP path (port frame in -> port frame out, PCMU)", onsets(INS), onsets(OUTS))


def main() -> None:
    import argparse

    from server.logging_setup import configure_logging

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3, help="calls per transport (the clock phases differ per call)")
    ap.add_argument("--transports", default="webrtc,sip,twilio")
    args = ap.parse_args()
    configure_logging("json", "warning")
    install_taps()
    wanted = args.transports.split(",")
    for _ in range(args.repeat):
        if "webrtc" in wanted:
            asyncio.run(bench_webrtc(args.seconds))
        if "twilio" in wanted:
            asyncio.run(bench_twilio(args.seconds))
    if "sip" in wanted:  # one pjsua2 library per process: SIP runs after the others
        for _ in range(args.repeat):
            bench_sip(args.seconds)


if __name__ == "__main__":
    main()
