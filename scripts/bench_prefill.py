#!/usr/bin/env python3
"""Prompt phase as one forward (prefill) against stepping it frame by frame.

Prints, for prompt phases of 100, 250 and 500 model steps: the time to run the phase (all but
its final step) as one prefill forward, and as single steps, alone and with 16 other calls in
the batch (the batch a live server steps every 80 ms). Median of several runs, ratio in the same
run. Tiny model on CPU; the 7B architecture (random weights, bf16) on CUDA when present.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from scripts.bench_common import random_7b, sync, synthetic_schedule, timed, tiny_model  # noqa: E402


def schedule_of(model, steps: int):
    """A synthetic prompt phase of about `steps` model steps (voice codes + text + silences)."""
    voice = 20
    return synthetic_schedule(model, n_text=max(1, steps - voice - 12), voice_frames=voice)


def measure(model, steps: int, batch: int, runs: int) -> tuple[float, float]:
    from agent.model.engine import Engine
    from agent.model.sampling import SamplingParams

    greedy = SamplingParams(greedy=True)
    sch = schedule_of(model, steps)
    prefill, stepped = [], []
    with Engine(model, batch + 1) as eng:
        for b in range(1, batch + 1):  # neighbours, live
            eng.start(b, schedule_of(model, 30), greedy)
        eng.step({})
        for _ in range(runs + 1):
            plan = eng.prepare(sch, greedy)

            def one_forward():
                run = eng.prefill([(0, plan)])
                run.advance()
                run.install()
                sync(model.device)
            prefill.append(timed(one_forward))
            eng.release(0)
            eng.start_stepped(0, sch, greedy)

            def step_by_step():
                for _ in range(sch.steps - 1):
                    eng.step({}, only={0})  # as the old spare-time prompt steps: the whole batch, masked
                sync(model.device)
            stepped.append(timed(step_by_step))
            eng.release(0)
    return statistics.median(prefill[1:]), statistics.median(stepped[1:])


def report(name: str, model, runs: int) -> None:
    print(f"== {name} ==", flush=True)
    print(f"{'prompt steps':>12} {'batch':>6} {'prefill':>10} {'stepped':>10} {'ratio':>7}")
    for steps in (100, 250, 500):
        for batch in (0, 16):
            pf, st = measure(model, steps, batch, runs)
            print(f"{steps:12d} {batch + 1:6d} {1000 * pf:8.1f}ms {1000 * st:8.1f}ms {st / pf:6.1f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    model, src = tiny_model("cpu")
    report(f"tiny model ({src.name}), CPU float32, {torch.get_num_threads()} threads", model, args.runs)
    if torch.cuda.is_available():
        report("PersonaPlex 7B architecture, random weights, CUDA bf16", random_7b("cuda"), args.runs)


if __name__ == "__main__":
    main()
