#!/usr/bin/env python3
"""Latency the transport path adds, with the model replaced by a pass-through (benchmark only).

For WebRTC (aiortc caller) and SIP (pjsua2 caller) it sends tone bursts, echoes caller audio
straight back through the real endpoint, session, scheduler and playout code, and timestamps
each burst where the caller's audio enters the server (decoded, before resampling) and where
the agent's packet leaves it (before encoding). Prints median / p90 / max over the bursts.
Target: at most one model frame (80 ms) + 20 ms.
"""

from __future__ import annotations

import asyncio
import os
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


def pass_through(engine) -> None:
    """Live calls get their own caller frame back instead of the model's output."""
    from agent.engine import FrameOut
    from agent.generator import Phase

    real = engine.step

    def step(feed, only=None):
        rows = engine.generator.stepping_rows(only)
        if rows and all(engine.generator.slots[b].phase is Phase.LIVE for b in rows):
            return {b: FrameOut(pcm=np.asarray(feed.get(b, np.zeros(1920, np.float32))), text_token=3, text=None,
                                tokens=np.zeros(17, np.int64), first=False) for b in rows}
        return real(feed, only)
    engine.step = step


def make_runtime(sip_port: int | None, http_port: int):
    from agent.server.config import ServerConfig
    from agent.server.runtime import Runtime

    cfg = ServerConfig.model_validate({
        "model": {"source": "demo", "device": "cpu"}, "personas": {"dir": str(ROOT / "personas")},
        "engine": {"max_calls": 2, "barge_in": {"enabled": False}},
        "http": {"host": "127.0.0.1", "port": http_port},
        "sip": {"enabled": sip_port is not None, "port": sip_port or 5060, "rtp_port": 23000},
        "logging": {"format": "json", "level": "warning"}})
    return Runtime(cfg)


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

    import telephony.webrtc.endpoint as wep
    import telephony.webrtc.tracks as tracks
    from tests.helpers_server import free_port
    from tests.webrtc_client import WebRtcCaller

    ins: list[tuple[float, np.ndarray]] = []
    outs: list[tuple[float, np.ndarray]] = []
    real_resampler = getattr(wep, "_real_FrameResampler", wep.FrameResampler)
    wep._real_FrameResampler = real_resampler

    class TapResampler(real_resampler):
        def __call__(self, frame):
            pcm = super().__call__(frame)
            ins.append((time.monotonic(), pcm))
            return pcm
    wep.FrameResampler = TapResampler
    real_recv = getattr(tracks, "_real_recv", tracks.AgentAudioTrack.recv)
    tracks._real_recv = real_recv

    async def recv(self):
        frame = await real_recv(self)
        outs.append((time.monotonic(), frame.to_ndarray().reshape(-1) / 32768.0))
        return frame
    tracks.AgentAudioTrack.recv = recv

    port = free_port()
    rt = make_runtime(None, port)
    await rt.start()
    pass_through(rt.scheduler.engine)
    rt.scheduler.wait_idle(60)
    with tempfile.TemporaryDirectory() as d:
        wav = os.path.join(d, "bursts.wav")
        sphn.write_wav(wav, bursts(48000, seconds), 48000)
        caller = WebRtcCaller(f"http://127.0.0.1:{port}", "citysan", wav)
        assert await caller.call() == 200
        await asyncio.sleep(seconds + 1)
        await caller.hangup()
    await rt.drain_and_stop()
    report("WebRTC path (decoded caller packet in -> agent packet out)", onsets(ins), onsets(outs))


def bench_sip(seconds: float) -> None:
    import sphn

    try:
        import pjsua2  # noqa: F401
    except ImportError:
        print("SIP: pjsua2 not installed (scripts/build_pjsua2.sh); skipped")
        return
    import telephony.sip.call as sipcall
    import telephony.sip.port as sipport
    from tests.helpers_server import free_port

    ins: list[tuple[float, np.ndarray]] = []
    outs: list[tuple[float, np.ndarray]] = []
    real_push = getattr(sipcall, "_real_push", sipcall.Capture.push)
    sipcall._real_push = real_push

    def push(self, pcm):
        ins.append((time.monotonic(), pcm))
        return real_push(self, pcm)
    sipcall.Capture.push = push
    real_req = getattr(sipport, "_real_req", sipport.CallAudioPort.onFrameRequested)
    sipport._real_req = real_req

    def on_req(self, frame):
        real_req(self, frame)
        outs.append((time.monotonic(), np.frombuffer(bytes(frame.buf), dtype="<i2") / 32768.0))
    sipport.CallAudioPort.onFrameRequested = on_req

    import socket

    sip_port = free_port(socket.SOCK_DGRAM)
    http_port = free_port()
    loop = asyncio.new_event_loop()
    rt = make_runtime(sip_port, http_port)
    loop.run_until_complete(rt.start())
    pass_through(rt.scheduler.engine)
    threading.Thread(target=loop.run_forever, daemon=True).start()
    rt.scheduler.wait_idle(60)
    with tempfile.TemporaryDirectory() as d:
        wav = os.path.join(d, "bursts16.wav")
        sphn.write_wav(wav, bursts(16000, seconds), 16000)
        subprocess.run([sys.executable, str(ROOT / "tests" / "sip_client.py"), f"sip:1001@127.0.0.1:{sip_port}",
                        wav, os.path.join(d, "heard.wav"), "--seconds", str(seconds), "--codec", "PCMU"],
                       capture_output=True, timeout=seconds + 60)
    asyncio.run_coroutine_threadsafe(rt.drain_and_stop(), loop).result(30)
    report("SIP path (port frame in -> port frame out, PCMU)", onsets(ins), onsets(outs))


def main() -> None:
    import argparse

    from agent.logging_setup import configure_logging

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=3, help="calls per transport (the clock phases differ per call)")
    args = ap.parse_args()
    configure_logging("json", "warning")
    for _ in range(args.repeat):
        asyncio.run(bench_webrtc(args.seconds))
    for _ in range(args.repeat):
        bench_sip(args.seconds)


if __name__ == "__main__":
    main()
