"""The real server, every transport and all the call plumbing, with a scripted agent (tests only).

    python -m tests.support.fake_server --config server.yaml [--mode tone|echo|speech --wav W]

The model is replaced, once the call path is warm, by a script whose output a test can check
exactly: `tone` speaks a 440 Hz tone and, like a model yielding the turn, falls silent for
QUIET_S after each barge-in; `speech` says the sentence in `--wav` (24 kHz) once, from the
call's first frame; `echo` returns the caller's own frame (what the latency benchmark uses).
Everything else is the product: admission, legs, VAD, barge-in flushing, pacing.

It also taps what each transport sends (the SIP port's frames, the WebRTC track's frames, the
carrier streams' media) and logs, per transport, when the agent's audio turns loud or quiet
(`{"event": "tap", "transport": ..., "leg": ..., "loud": ..., "t": wall clock}`), so a test can
measure how soon what the caller hears follows a barge-in.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np
import structlog

from agent.timebase import FRAME, SAMPLE_RATE

TONE_HZ = 440.0
TONE_LEVEL = 0.3
QUIET_S = 1.5
LOUD = 0.05  # rms above which a packet counts as the agent talking

log = structlog.get_logger("fake")


def scripted(scheduler, mode: str, sentence: np.ndarray | None = None) -> None:
    """Replace the engine's step for live calls (prompt steps stay real: calls start as usual)."""
    from agent.model.engine import SlotOutput
    from agent.model.generator import Phase

    engine = scheduler.engine
    real = engine.step
    phase: dict[str, int] = {}  # frames each call's agent has said
    quiet_until: dict[str, float] = {}
    seen_gen: dict[str, int] = {}
    t = np.arange(FRAME) / SAMPLE_RATE

    def frame_for(slot: int, feed) -> np.ndarray:
        if mode == "echo":
            return np.asarray(feed.get(slot, np.zeros(FRAME, np.float32)), dtype=np.float32)
        binding = scheduler._calls.get(slot)
        sess = binding.session if binding is not None else None
        key = sess.call_id if sess is not None else str(slot)
        if mode == "speech":
            k = phase.get(key, 0)
            phase[key] = k + 1
            out = np.zeros(FRAME, np.float32)
            piece = sentence[k * FRAME:(k + 1) * FRAME]
            out[: len(piece)] = piece
            return out
        now = time.monotonic()
        if sess is not None and sess.generation != seen_gen.get(sess.call_id, 0):
            seen_gen[sess.call_id] = sess.generation
            quiet_until[sess.call_id] = now + QUIET_S  # interrupted: yield the turn for a while
        if sess is not None and now < quiet_until.get(sess.call_id, 0):
            return np.zeros(FRAME, np.float32)
        k = phase.get(key, 0)
        phase[key] = k + 1
        return (TONE_LEVEL * np.sin(2 * np.pi * TONE_HZ * (t + k * FRAME / SAMPLE_RATE))).astype(np.float32)

    def step(feed, only=None):
        rows = engine.generator.stepping_rows(only)
        live = [b for b in rows if engine.generator.slots[b].phase is Phase.LIVE]
        out = real(feed, set(rows) - set(live)) if len(live) < len(rows) else {}
        for b in live:
            engine.generator.slots[b].offset += 1  # positions advance as for a real step
            out[b] = SlotOutput(pcm=frame_for(b, feed), text_token=3, text=None, tokens=np.zeros(17, np.int64),
                              first=False)
        return out
    engine.step = step
    log.info("fake_engine", mode=mode)


class _Tap:
    """Logs when a transport's outgoing agent audio turns loud or quiet."""

    def __init__(self, transport: str):
        self.transport = transport
        self.loud: dict[int, bool] = {}

    def __call__(self, key: int, pcm: np.ndarray) -> None:
        loud = bool(len(pcm)) and float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) > LOUD
        if self.loud.get(key) != loud:
            self.loud[key] = loud
            log.info("tap", transport=self.transport, leg=key, loud=loud, t=time.time())


def install_taps() -> None:
    import telephony.streams.base as ms
    import telephony.sip.call as sipcall
    import telephony.webrtc.tracks as tracks

    web_tap, stream_tap = _Tap("webrtc"), _Tap("stream")
    real_pump = sipcall.SipCall.pump

    def pump(self):  # the SIP port's own tap times each change as the bridge clock sends it
        real_pump(self)
        port = self.port
        if port is None:
            return
        if not getattr(port, "tapped", False):
            port.tap(LOUD)
            port.tapped = True
        for loud, t in port.tap_events():
            log.info("tap", transport="sip", leg=id(port), loud=loud, t=t)
    sipcall.SipCall.pump = pump
    real_pcm = tracks.AgentAudioTrack.next_pcm

    async def next_pcm(self):
        pts, pcm = await real_pcm(self)
        web_tap(id(self), pcm)
        return pts, pcm
    tracks.AgentAudioTrack.next_pcm = next_pcm
    real_next = ms.StreamLeg.__init__

    def init(self, *a, **kw):
        real_next(self, *a, **kw)
        real_packet = self.playout.next_packet

        def next_packet():
            pkt = real_packet()
            stream_tap(id(self), pkt)
            return pkt
        self.playout.next_packet = next_packet
    ms.StreamLeg.__init__ = init


def main() -> int:
    from pathlib import Path

    from server.logging_setup import configure_logging
    from server.config import load_config
    from server.runtime import Runtime

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--mode", choices=["tone", "echo", "speech"], default="tone")
    ap.add_argument("--wav", help="the agent's sentence for --mode speech")
    args = ap.parse_args()
    cfg = load_config(args.config, base_dir=Path.cwd())
    configure_logging("json", cfg.logging.level)
    install_taps()
    rt = Runtime(cfg)
    sentence = None
    if args.mode == "speech":
        from agent.audio_io import read_audio

        sentence = read_audio(args.wav, SAMPLE_RATE)
    rt.on_warm.append(lambda r: scripted(r.scheduler, args.mode, sentence))
    return asyncio.run(rt.serve_forever())


if __name__ == "__main__":
    raise SystemExit(main())
