#!/usr/bin/env python3
"""Re-prime cost: rebuilding a call's model state from its prompt and its latest frames.

Prints, for windows of 500, 1500 and 2800 conversation frames (after a ~70-step prompt phase):
- alone: the rebuild as one prefill forward (the call's row only), median of several runs;
- beside 16 live calls: the rebuild in chunks in each 80 ms tick's spare time (at least the pace
  that finishes it within its 20 s lead), as the scheduler runs it (the 16 calls and the rebuilt call stepping every tick): its wall time, ticks and
  chunks, and the tick's busy time (step + rebuild chunk) median/p99 against ticks without one.
Demo model on CPU (its context is 3000 frames, as PersonaPlex's); the 7B architecture (random
weights, bf16) on CUDA when present.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scripts.bench_common import random_7b, sync, synthetic_schedule  # noqa: E402

TICK_S = 0.080
MARGIN_S = 0.004
LEAD = 250  # frames a rebuild has before its call's deadline on PersonaPlex (ReprimeConfig(3000))


def p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99)) if xs else float("nan")


def setup(eng, live: int, window: int, rng):
    """Slot 0: the call to re-prime, live, its ring holding `window` frames; slots 1..live: calls."""
    from agent.calls.reprime import CallHistory, ColumnRing, column_dtype
    from agent.model.sampling import SamplingParams

    greedy = SamplingParams(greedy=True)
    sched = synthetic_schedule(eng.model, n_text=40, voice_frames=20)
    start = eng.prepare(sched, greedy)
    run = eng.prefill([(0, start)])
    run.advance()
    run.install()
    for b in range(1, live + 1):
        eng.start(b, synthetic_schedule(eng.model, n_text=20, voice_frames=10), greedy)
    for _ in range(2):
        eng.step({})
    gen = eng.generator
    ring = ColumnRing(eng.model.context, column_dtype(gen))
    card = min(gen.card, gen.text_card)
    for _ in range(window):
        ring.append(rng.integers(0, card, 17).astype(ring.buf.dtype))
    return CallHistory(start.plan, window, ring, None)


def alone(model, window: int, runs: int) -> float:
    from agent.model.engine import Engine
    from agent.calls.reprime import Rebuild

    rng = np.random.default_rng(1)
    times = []
    with Engine(model, 1) as eng:
        h = setup(eng, 0, window, rng)
        for _ in range(runs + 1):
            t0 = time.perf_counter()
            rb = Rebuild(eng.generator, 0, h, lead=250)
            rb.advance(rb.lag)
            rb.install()
            sync(model.device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def beside(model, window: int, live: int, ticks_before: int = 40) -> dict:
    """Ticks of `live` + 1 calls; after `ticks_before` plain ticks, a rebuild of slot 0 in spare time."""
    from agent.model.engine import Engine
    from agent.calls.reprime import Rebuild, _Cost

    rng = np.random.default_rng(2)
    frame = np.zeros(1920, np.float32)
    plain, during = [], []
    cost = _Cost(None)
    res: dict = {}
    with Engine(model, live + 1) as eng:
        h = setup(eng, live, window, rng)
        feed = {b: frame for b in range(live + 1)}
        rb = None
        t_start = 0.0
        ticks = chunks = 0
        for tick in range(100000):
            t0 = time.perf_counter()
            outs = eng.step(feed)
            sync(model.device)
            out = outs.get(0)
            room = rb is None or rb.target < model.context - 2  # (a synthetic call: it pauses at the context)
            if out is not None and out.fed is not None and room:
                h.ring.append(out.fed)
            if tick == ticks_before:
                rb = Rebuild(eng.generator, 0, h, lead=250)
                t_start = t0
            if rb is not None:
                ticks += 1
                left = t0 + TICK_S - MARGIN_S - time.perf_counter()
                # spare time, or the pace that finishes within the lead (as the lane paces an
                # urgent rebuild)
                n = max(cost.fits(left), -(-rb.lag // max(1, LEAD - ticks)) + 1)
                if n and rb.lag:
                    c0 = time.perf_counter()
                    k = min(rb.lag, n)
                    rb.advance(k)
                    sync(model.device)
                    cost.observe(k, time.perf_counter() - c0)
                    chunks += 1
                if rb.lag == 0:
                    rb.install()
                    res.update(wall_ms=1000 * (time.perf_counter() - t_start), ticks=ticks, chunks=chunks)
            busy = time.perf_counter() - t0
            (during if rb is not None else plain).append(busy)
            if rb is not None and rb.lag == 0 and "wall_ms" in res:
                break
            if tick > ticks_before + 5000:
                res.update(wall_ms=float("nan"), ticks=ticks, chunks=chunks)
                break
            # keep to the clock: a real tick does not start before its time
            rest = t0 + TICK_S - time.perf_counter()
            if rest > 0:
                time.sleep(rest)
    res.update(plain_med=1000 * statistics.median(plain[2:]), plain_p99=1000 * p99(plain[2:]),
               during_med=1000 * statistics.median(during), during_p99=1000 * p99(during),
               over=sum(1 for x in during if x > TICK_S))
    return res


def report(name: str, model, runs: int, live: int) -> None:
    print(f"== {name} ==", flush=True)
    print(f"{'window':>7} {'alone':>9} | beside {live} live: {'wall':>8} {'ticks':>5} {'chunks':>6} "
          f"{'tick med/p99 without':>21} {'with':>14} {'>80ms':>5}")
    for window in (500, 1500, 2800):
        a = alone(model, window, runs)
        b = beside(model, window, live)
        print(f"{window:7d} {1000 * a:7.1f}ms | {'':>15}{b['wall_ms']:7.0f}ms {b['ticks']:5d} {b['chunks']:6d} "
              f"{b['plain_med']:9.1f}/{b['plain_p99']:5.1f} ms {b['during_med']:7.1f}/{b['during_p99']:5.1f} ms "
              f"{b['over']:5d}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--live", type=int, default=16)
    args = ap.parse_args()
    from agent.model.threads import configure_torch_threads

    configure_torch_threads()
    from agent.model.demo import demo_model_dir
    from agent.model.files import local_model_files
    from agent.model.loader import load_model

    model = load_model(local_model_files(demo_model_dir()), device="cpu")
    report(f"demo model, CPU float32, {torch.get_num_threads()} threads", model, args.runs, args.live)
    if torch.cuda.is_available():
        report("PersonaPlex 7B architecture, random weights, CUDA bf16", random_7b("cuda"), args.runs, args.live)


if __name__ == "__main__":
    main()
