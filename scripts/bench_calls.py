#!/usr/bin/env python3
"""N calls through the real-time scheduler, fed caller audio in real time.

Prints per N live calls:
- engine step time per frame (median, p99): the 80 ms budget is for all calls together;
- late caller frames, catch-up steps and caller audio dropped per call (the caller's words
  must all reach the model);
- time to the first agent frame of a call whose prompt was never seen before, placed while the
  N calls talk: new path (prefill) in ms and ticks, and the old path (prompt stepped one frame per
  tick plus extra steps in spare time, emulated here on the same engine) in ms.
With --vad, barge-in VAD runs as in production (batched over calls); --vad-per-call runs the
same network call by call, as before batching, for comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scripts.bench_common import median_ms, p99_ms, speech_frames  # noqa: E402

TICK = 0.08


def caller_audio(seconds: float) -> np.ndarray:
    """Real speech (espeak-ng) when available, else a speech-like synthetic signal."""
    from agent.audio_io import read_audio

    if shutil.which("espeak-ng"):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s.wav")
            subprocess.run(["espeak-ng", "-w", path, "Hello, I would like to know when my next pickup is. "
                            "Can you also tell me the price of the compost bin?"], check=True, capture_output=True)
            pcm = read_audio(path, 24000)
        reps = int(np.ceil(seconds * 24000 / len(pcm)))
        return np.tile(pcm, reps)[: int(seconds * 24000)]
    return np.concatenate(speech_frames(int(seconds * 12.5)))


def new_prompt(persona, k: int) -> str:
    return f"{persona.prompt} Verify customer name Caller {k}. Account number {1000 + 37 * k}."


def talk(calls, audio: np.ndarray, stop: threading.Event) -> threading.Thread:
    """One thread pushing 20 ms packets to every call at real-time pace (from its answer on)."""
    def run():
        t0 = time.monotonic()
        i = 0
        while not stop.is_set():
            for c in calls:
                if c.answered_at is not None:
                    c.push_audio(audio[i % len(audio):i % len(audio) + 480])
                c.pull_frame()
            i += 480
            time.sleep(max(0.0, t0 + i / 24000 - time.monotonic()))
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def run_new(model, persona, n: int, seconds: float, vad: str) -> dict:
    from agent.barge_in.detector import BargeInConfig
    from agent.calls.events import CallState
    from agent.calls.scheduler import Scheduler, SchedulerConfig

    if vad == "per-call":
        from agent.barge_in.vad import BatchedVad

        def one_by_one(self, streams):
            probs = [[] for _ in streams]
            for i, s in enumerate(streams):
                while s.ready:
                    probs[i].append(self.forward([s])[0])
            return probs
        BatchedVad.run = one_by_one
    sch = Scheduler(model, SchedulerConfig(max_calls=n + 1, barge_in=BargeInConfig(enabled=vad != "off"),
                                           idle_timeout_s=60))
    sch.start()
    try:
        sch.warm_up(persona.voice, persona.prompt)
        calls = [sch.place_call(persona, "bench", "bench", seed=i) for i in range(n)]
        stop = threading.Event()
        feeder = talk(calls, caller_audio(seconds + 10), stop)
        while any(c.state is not CallState.LIVE for c in calls):
            time.sleep(0.01)
        steps: list[float] = []
        orig = sch.engine.step

        def timed_step(*a, **kw):
            t0 = time.perf_counter()
            r = orig(*a, **kw)
            if kw.get("only") is None:
                steps.append(time.perf_counter() - t0)
            return r
        sch.engine.step = timed_step
        overruns0, ticks0 = sch.overruns, sch.ticks
        answers_ms, answers_ticks = [], []
        t_end = time.monotonic() + seconds
        k = 0
        while time.monotonic() < t_end:
            time.sleep(0.3 + 0.037 * (k % 3))  # land at different points of the tick
            t0 = time.monotonic()
            new = sch.place_call(persona, "bench", "bench", prompt=new_prompt(persona, k))
            while new.state is not CallState.LIVE and time.monotonic() - t0 < 10:
                time.sleep(0.002)
            answers_ms.append(1000 * (new.answered_at - new.created))
            answers_ticks.append(new.answer_ticks)
            new.hangup()
            while sch.capacity_left < 1:
                time.sleep(0.005)
            k += 1
        stop.set()
        feeder.join()
        st = [c.stats for c in calls]
        return {"n": n, "median_ms": median_ms(steps), "p99_ms": p99_ms(steps),
                "late": sum(s.late_inbound for s in st), "frames": sum(s.frames_in for s in st),
                "catch_up": sum(s.catch_up_steps for s in st),
                "dropped_ms": max(1000 * s.caller_dropped_s for s in st),
                "overruns": sch.overruns - overruns0, "ticks": sch.ticks - ticks0,
                "answer_ms": statistics.median(answers_ms), "answer_max_ms": max(answers_ms),
                "answer_ticks": max(answers_ticks), "answers": len(answers_ms)}
    finally:
        sch.stop()


def run_old(model, persona, n: int, tries: int = 3) -> float:
    """The old start path on the same engine: the new call's prompt stepped one frame per tick
    with the live calls, plus extra prompt steps in each tick's spare time (what the scheduler did
    before prefill). Median ms from placing the call to its first frame."""
    from agent.model.engine import Engine
    from agent.model.generator import Phase
    from agent.model.sampling import SamplingParams

    frames = speech_frames(8)
    out = []
    with Engine(model, n + 1) as eng:
        for b in range(1, n + 1):
            eng.start(b, eng.schedule(persona.voice, persona.prompt), SamplingParams(), seed=b)
        eng.step({})
        for k in range(tries):
            t0 = time.monotonic()
            eng.start_stepped(0, eng.schedule(persona.voice, new_prompt(persona, 100 + k)), SamplingParams())
            next_tick, est = time.monotonic(), 0.0
            while eng.phase(0) is not Phase.LIVE:
                feed = {b: frames[k % 8] for b in range(1, n + 1)}
                eng.step(feed)
                while eng.phase(0) is Phase.PROMPT and time.monotonic() + max(1.5 * est, 0.002) < next_tick + TICK - 0.005:
                    s0 = time.monotonic()
                    eng.step({}, only={0})
                    est = 0.8 * est + 0.2 * (time.monotonic() - s0)
                next_tick += TICK
                time.sleep(max(0.0, next_tick - time.monotonic()))
            out.append(1000 * (time.monotonic() - t0))
            eng.release(0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", default="1,4,16,32")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--vad", action="store_true", help="barge-in VAD as in production (batched)")
    ap.add_argument("--vad-per-call", action="store_true", help="VAD call by call (before batching)")
    ap.add_argument("--no-old", action="store_true", help="skip the old (stepped prompt) path")
    ap.add_argument("--model-dir", help="PersonaPlex weights to run on CUDA instead of the demo model")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: as the server, one fewer than the cores)")
    args = ap.parse_args()
    from agent.model.threads import configure_torch_threads

    configure_torch_threads(args.threads)
    from server.logging_setup import configure_logging

    configure_logging("console", "warning")
    from agent.personas import load_persona_dir
    from agent.model.voices import STOCK_VOICES

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    persona = load_persona_dir(os.path.join(root, "personas"), STOCK_VOICES).route("1001")
    from agent.model.demo import demo_model_dir
    from agent.model.files import local_model_files
    from agent.model.loader import load_model

    if args.model_dir and torch.cuda.is_available():
        name, model = f"{args.model_dir}, CUDA", load_model(local_model_files(Path(args.model_dir)), device="cuda")
    else:
        name, model = "tiny demo model, CPU float32", load_model(local_model_files(demo_model_dir()), device="cpu")
    vad = "per-call" if args.vad_per_call else ("batched" if args.vad else "off")
    print(f"== {name}, persona {persona.id}, {args.seconds:.0f} s per N, VAD {vad}, "
          f"{torch.get_num_threads()} torch threads ==", flush=True)
    print(f"{'calls':>5} {'step med':>9} {'step p99':>9} {'late':>10} {'catch-up':>8} {'dropped':>8} "
          f"{'overruns':>9} {'new: first frame':>17} {'ticks':>5} {'old: first frame':>17}")
    for n in [int(x) for x in args.calls.split(",")]:
        r = run_new(model, persona, n, args.seconds, vad)
        old = "" if args.no_old else f"{run_old(model, persona, n):15.0f}ms"
        print(f"{r['n']:5d} {r['median_ms']:7.1f}ms {r['p99_ms']:7.1f}ms {r['late']:4d}/{r['frames']:<5d} "
              f"{r['catch_up']:8d} {r['dropped_ms']:6.0f}ms {r['overruns']:4d}/{r['ticks']:<4d} "
              f"{r['answer_ms']:7.0f}ms (max {r['answer_max_ms']:4.0f}) {r['answer_ticks']:5d} {old}", flush=True)


if __name__ == "__main__":
    main()
