#!/usr/bin/env python3
"""What the caller transcriber adds to the 80 ms tick: the tick's model work with and without it.

Per batch size (1 and 16 live calls by default), on the built-in demo models (tiny PersonaPlex and
tiny Kyutai-STT, CPU float32; with --device cuda on a GPU, the same tiny models there): the
median and p99 of
- `engine`: `Engine.step` as without a transcriber (Mimi encodes 8 caller codebooks);
- `engine32`: `Engine.step` encoding the 32 codebooks the STT reads (PersonaPlex gets the first 8);
- `stt`: the transcriber's step on those codes;
- `tick`: engine32 + stt, what a tick costs with the transcriber, against `engine` without it.
All calls are live and talking; each configuration is stepped `--steps` times in all, in
alternating rounds, after a warm-up per round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("NO_TORCH_COMPILE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.bench_common import median_ms, p99_ms, speech_frames, sync, synthetic_schedule  # noqa: E402


def live_engine(model, batch: int, caller_codebooks: int | None):
    from agent.model.engine import Engine
    from agent.model.sampling import SamplingParams

    eng = Engine(model, batch, caller_codebooks=caller_codebooks)
    sch = synthetic_schedule(model, n_text=8, voice_frames=4)
    for b in range(batch):
        eng.start(b, sch, SamplingParams(), seed=b)
    while any(eng.phase(b).value != "live" for b in range(batch)):
        eng.step({})
    return eng


def measure(model, stt, batch: int, steps: int, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Both configurations in alternating rounds (the machine's load drifts: neither gets the
    quieter minutes), `steps` measured steps each in all."""
    import time

    from agent.transcribe.transcriber import BatchedTranscriber

    per = max(1, steps // rounds)
    frames = speech_frames(per + warmup)
    out: dict[str, list[float]] = {"engine": [], "engine32": [], "stt": [], "tick": []}
    for _ in range(rounds):
        with live_engine(model, batch, None) as eng:
            for i in range(per + warmup):
                t0 = time.perf_counter()
                eng.step({b: frames[i] for b in range(batch)})
                sync(model.device)
                if i >= warmup:
                    out["engine"].append(time.perf_counter() - t0)
        tr = BatchedTranscriber(stt, batch)
        try:
            with live_engine(model, batch, stt.codebooks) as eng:
                for b in range(batch):
                    tr.join(b, f"call-{b}", t_first=0.08)
                for i in range(per + warmup):
                    t0 = time.perf_counter()
                    res = eng.step({b: frames[i] for b in range(batch)})
                    sync(model.device)
                    t1 = time.perf_counter()
                    tr.step({b: r.caller_codes for b, r in res.items()})
                    sync(model.device)
                    t2 = time.perf_counter()
                    if i >= warmup:
                        out["engine32"].append(t1 - t0)
                        out["stt"].append(t2 - t1)
                        out["tick"].append(t2 - t0)
        finally:
            tr.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16", help="live calls per run, comma-separated")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured steps at the start of each round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from agent.model.demo import demo_model_dir
    from agent.model.files import local_model_files
    from agent.model.loader import load_model
    from agent.model.threads import configure_torch_threads
    from agent.transcribe.demo import demo_stt_dir
    from agent.transcribe.files import local_stt_files
    from agent.transcribe.model import load_stt

    threads = configure_torch_threads()
    demo = demo_model_dir()
    model = load_model(local_model_files(demo), device=args.device)
    stt = load_stt(local_stt_files(demo_stt_dir(demo)), model)
    print(f"demo models (tiny PersonaPlex + tiny Kyutai-STT), {args.device}, torch threads {threads}, "
          f"{args.steps} steps in {args.rounds} rounds")
    print(f"{'calls':>5} {'part':>9} {'median ms':>10} {'p99 ms':>8}")
    report = {}
    for batch in (int(b) for b in args.batches.split(",")):
        got = measure(model, stt, batch, args.steps, args.warmup, args.rounds)
        report[batch] = {k: {"median_ms": round(median_ms(v), 2), "p99_ms": round(p99_ms(v), 2)}
                         for k, v in got.items()}
        for part, fig in report[batch].items():
            print(f"{batch:>5} {part:>9} {fig['median_ms']:>10.2f} {fig['p99_ms']:>8.2f}")
        extra = report[batch]["tick"]["median_ms"] - report[batch]["engine"]["median_ms"]
        print(f"{batch:>5} {'+stt':>9} {extra:>+10.2f}   (tick with the transcriber - engine without, medians)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "threads": threads, "steps": args.steps, "batches": report}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
