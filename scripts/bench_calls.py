#!/usr/bin/env python3
"""N simulated calls through the scheduler, fed caller audio in real time.

Prints per N: engine step time per frame (median, p99), late inbound frames, engine overruns,
and answer latency from call start to the first agent frame, cold (prompt phase run by the
call) and from a persona snapshot. Tiny model on CPU; 7B architecture on CUDA when present.
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


def run(model, persona, n: int, seconds: float, vad: bool) -> dict:
    from agent.barge_in import BargeInConfig
    from agent.scheduler import Scheduler, SchedulerConfig

    sch = Scheduler(model, SchedulerConfig(max_calls=n, barge_in=BargeInConfig(enabled=vad), idle_timeout_s=60))
    sch.start()
    try:
        cold = sch.place_call(persona, "bench", "bench")
        while cold.answered_at is None:
            cold.pull_frame()
            cold.push_audio(np.zeros(1920, np.float32))
            time.sleep(0.08)
        cold_latency = cold.answered_at - cold.created
        cold.hangup()
        time.sleep(0.2)
        sch.metrics.step_seconds._sum.set(0)
        calls = [sch.place_call(persona, "bench", "bench", seed=i) for i in range(n)]
        ticks0 = sch.ticks
        overruns0 = sch.overruns
        audio = caller_audio(seconds)
        step_times: list[float] = []
        orig_step = sch.engine.step

        def timed_step(*a, **kw):
            t0 = time.perf_counter()
            r = orig_step(*a, **kw)
            if kw.get("only") is None:
                step_times.append(time.perf_counter() - t0)
            return r
        sch.engine.step = timed_step
        stop = threading.Event()

        def feeder():
            t0 = time.monotonic()
            i = 0
            while i < len(audio) and not stop.is_set():
                for c in calls:
                    c.push_audio(audio[i:i + 480])
                    c.pull_frame()
                i += 480
                time.sleep(max(0.0, t0 + i / 24000 - time.monotonic()))
        th = threading.Thread(target=feeder)
        th.start()
        th.join()
        answers = [c.answered_at - c.created for c in calls if c.answered_at]
        late = sum(c.stats.late_inbound for c in calls)
        frames = sum(c.stats.frames_in for c in calls)
        return {"n": n, "median_ms": median_ms(step_times), "p99_ms": p99_ms(step_times),
                "late": late, "frames": frames, "overruns": sch.overruns - overruns0, "ticks": sch.ticks - ticks0,
                "answer_cold_ms": 1000 * cold_latency, "answer_snapshot_ms": 1000 * statistics.median(answers)}
    finally:
        sch.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", default="1,4,16,32")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--vad", action="store_true", help="run barge-in VAD as in production")
    ap.add_argument("--model-dir", help="also run with this model on CUDA (PersonaPlex 7B weights)")
    args = ap.parse_args()
    from agent.personas import load_persona_dir
    from agent.voices import STOCK_VOICES

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    reg = load_persona_dir(os.path.join(root, "personas"), STOCK_VOICES)
    persona = reg.route("1001")
    from agent.demo_model import demo_model_dir
    from agent.model_files import local_model_files
    from agent.model_loader import load_model

    models = [("tiny demo model, CPU float32", load_model(local_model_files(demo_model_dir()), device="cpu"))]
    if torch.cuda.is_available() and args.model_dir:
        models.append((f"{args.model_dir}, CUDA", load_model(local_model_files(Path(args.model_dir)), device="cuda")))
    elif torch.cuda.is_available():
        print("CUDA present: pass --model-dir with PersonaPlex weights for 7B call figures "
              "(scripts/bench_engine.py measures the 7B architecture without weights)")
    for name, model in models:
        print(f"== {name}, persona {persona.id}, {args.seconds:.0f} s of caller audio per call ==", flush=True)
        print(f"{'calls':>5} {'step med':>9} {'step p99':>9} {'late':>10} {'overruns':>9} "
              f"{'answer cold':>12} {'answer snap':>12}")
        for n in [int(x) for x in args.calls.split(",")]:
            r = run(model, persona, n, args.seconds, args.vad)
            print(f"{r['n']:5d} {r['median_ms']:7.1f}ms {r['p99_ms']:7.1f}ms {r['late']:4d}/{r['frames']:<5d} "
                  f"{r['overruns']:4d}/{r['ticks']:<4d} {r['answer_cold_ms']:10.0f}ms {r['answer_snapshot_ms']:10.0f}ms",
                  flush=True)


if __name__ == "__main__":
    main()
