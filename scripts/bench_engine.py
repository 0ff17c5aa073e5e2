#!/usr/bin/env python3
"""Engine step time per 80 ms frame at several batch sizes (all slots live).

Prints, per device/model: median ms per frame at batch 1, 4, 16 and the largest batch whose
median stays under the 80 ms real-time budget. Tiny model on CPU always; the 7B architecture
(random weights) on CUDA when a GPU is present.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from scripts.bench_common import (median_ms, random_7b, speech_frames, sync, synthetic_schedule,  # noqa: E402
                                  timed, tiny_model)

BUDGET_MS = 80.0


def step_time(model, batch: int, steps: int, warmup: int = 3) -> float:
    from agent.model.engine import Engine
    from agent.model.sampling import SamplingParams

    with Engine(model, batch) as eng:
        sch = synthetic_schedule(model, n_text=8, voice_frames=4)
        for b in range(batch):
            eng.start(b, sch, SamplingParams(), seed=b)
        while any(eng.phase(b).value != "live" for b in range(batch)):
            eng.step({})
        frames = speech_frames(steps + warmup)
        samples = []
        for i in range(steps + warmup):
            feed = {b: frames[i] for b in range(batch)}
            dt = timed(lambda: (eng.step(feed), sync(model.device)))
            if i >= warmup:
                samples.append(dt)
    return median_ms(samples)


def largest_under_budget(model, steps: int, limit: int) -> tuple[int, float]:
    best, best_ms, b = 0, float("nan"), 1
    while b <= limit:
        ms = step_time(model, b, steps)
        if ms > BUDGET_MS:
            break
        best, best_ms = b, ms
        b *= 2
    lo, hi = best, min(b, limit + 1)
    while hi - lo > 1:  # refine between the last good and first bad power of two
        mid = (lo + hi) // 2
        ms = step_time(model, mid, steps)
        if ms <= BUDGET_MS:
            lo, best_ms = mid, ms
        else:
            hi = mid
    return lo, best_ms


def report(name: str, model, steps: int, limit: int) -> None:
    print(f"== {name} ==", flush=True)
    for b in (1, 4, 16):
        print(f"  batch {b:3d}: median {step_time(model, b, steps):7.1f} ms/frame", flush=True)
    n, ms = largest_under_budget(model, steps, limit)
    print(f"  largest batch under {BUDGET_MS:.0f} ms/frame: {n} (median {ms:.1f} ms)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, src = tiny_model("cpu")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, tiny model from {src}")
    report("tiny model, CPU, float32", model, args.steps, args.max_batch)
    if torch.cuda.is_available():
        big = random_7b("cuda")
        report(f"PersonaPlex 7B architecture (random weights), {torch.cuda.get_device_name()}, bfloat16",
               big, args.steps, args.max_batch)
    else:
        print("no CUDA GPU: 7B figures skipped (run this script on a GPU machine)")


if __name__ == "__main__":
    main()
