#!/usr/bin/env python3
"""The media plane's cost: N concurrent calls per transport against the real server with the model
replaced by an echo (`tests/support/fake_server.py --mode echo`: transports, legs, VAD and the
scheduler are the product), callers on this machine.

    scripts/bench_media.py --calls 8 --seconds 20 --transports sip,twilio,telnyx,webrtc
    scripts/bench_media.py --tree before=/tmp/main --tree after=.   # before/after in one run

Callers: sipp for SIP (PCMU RTP), the carriers' WebSocket callers of tests/support/carriers.py
for Twilio and Telnyx, aiortc callers for WebRTC (sending Opus in the packet length the answer
asks for, as Chromium and Firefox do; aiortc's own sender keeps to 20 ms), each in a process of
its own so that their CPU is reported apart from the server's. For each transport it prints: the server's CPU over the
calls' steady state (% of one core: all, per call above the idle server, and by thread), the
callers' CPU, and from each call's `call_end` line: caller frames the engine received against
those expected for the call's length, late frames, playout underruns, caller audio dropped by
the latency bound and lost on the way in (`caller_audio_lost_s`, where the server counts it).

`--tree NAME=PATH` runs the server from another checkout of this project (PYTHONPATH=PATH), so a
before/after comparison shares one machine, one moment and the same callers. `--model demo` runs
the real server with the tiny demo model instead of the echo (the engine's own cost in the
tick), for comparing its step time with `bench_calls.py --vad` at the same number of calls.

Each row also gives the engine's step time over the window (median and p99, from the server's
`personaplex_engine_step_seconds` histogram: read as the upper edge of the bucket they fall in,
5 ms resolution from 30 to 80 ms), how late the engine thread woke for its ticks against the
idle server (`personaplex_tick_late_seconds`: 0.5 ms resolution below 2 ms; it waits for the
interpreter lock the transports also take), and the steady window's own counts from the server's
/metrics: caller audio dropped and lost, late frames, engine overruns and playout underruns
between every call being answered and the first hang-up (the `call_end` totals include the
calls' start, where N simultaneous prompts are the engine's work, not the media plane's).
`--json FILE` writes the rows with every call's `call_end` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLK = os.sysconf("SC_CLK_TCK")
FRAME_S = 0.08
TRANSPORTS = ("sip", "twilio", "telnyx", "webrtc")


# ---- CPU from /proc ----------------------------------------------------------------------------

def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its reaped children so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / CLK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds by thread name (threads of one name summed: asyncio's, pjsua's workers)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1: raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK
    return out


class CpuWindow:
    """CPU of a set of processes between `start()` and `stop()`, as % of one core."""

    def __init__(self, pids: list[int]):
        self.pids = pids

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = {p: proc_cpu(p) for p in self.pids}
        self.th0 = {p: thread_cpu(p) for p in self.pids}

    def stop(self) -> dict:
        dt = time.monotonic() - self.t0
        total = sum(proc_cpu(p) - self.c0[p] for p in self.pids if Path(f"/proc/{p}").exists())
        threads: dict[str, float] = {}
        for p in self.pids:
            if not Path(f"/proc/{p}").exists():
                continue
            for name, c in thread_cpu(p).items():
                threads[name] = threads.get(name, 0.0) + c - self.th0[p].get(name, 0.0)
        return {"pct": 100 * total / dt, "threads": {k: 100 * v / dt for k, v in threads.items() if v > 0.005 * dt}}


# ---- caller audio ------------------------------------------------------------------------------

def write_wav(path: Path, rate: int, seconds: float) -> None:
    """A voice-like signal (a swelling 200-900 Hz sweep with pauses) as 16-bit mono."""
    import numpy as np

    t = np.arange(int(rate * seconds)) / rate
    f = 200 + 700 * (0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * t))
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(f) / rate) * (np.sin(2 * np.pi * 0.4 * t) > -0.3)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())


# ---- callers (each transport's own process) ----------------------------------------------------

async def carrier_callers(kind: str, url: str, token: str, calls: int, seconds: float, wav: str) -> list[dict]:
    from tests.support.carriers import TelnyxCaller, TwilioCaller

    async def one(i: int) -> dict:
        await asyncio.sleep(i * 0.05)  # a little stagger, as calls arrive
        if kind == "twilio":
            c = TwilioCaller(url + "/twilio/media", parameters={"to": "1001"}, wav_or_pcm=wav, auth_token=token)
        else:
            c = TelnyxCaller(url + "/telnyx/media", dialled="1001", wav_or_pcm=wav, auth_token=token)
        await c.run(seconds)
        return {"frames_sent": c.frames_sent, "agent_s": round(c.agent_seconds, 2), "errors": c.protocol_errors[:3]}
    return await asyncio.gather(*(one(i) for i in range(calls)))


async def webrtc_callers(url: str, calls: int, seconds: float, wav: str) -> list[dict]:
    from tests.support.webrtc_client import WebRtcCaller

    async def one(i: int) -> dict:
        await asyncio.sleep(i * 0.05)
        c = WebRtcCaller(url, "1001", wav, as_browser=True)  # the packet length the answer asks for
        status = await c.call()
        if status != 200:
            return {"status": status}
        await asyncio.sleep(seconds)
        await c.hangup()
        return {"status": status, "received_s": round(sum(len(x) for x in c.received) / 48000, 2)}
    return await asyncio.gather(*(one(i) for i in range(calls)))


def caller_main(args) -> None:
    if args.caller in ("twilio", "telnyx"):
        out = asyncio.run(carrier_callers(args.caller, args.url, args.token, args.calls, args.seconds, args.wav))
    else:
        out = asyncio.run(webrtc_callers(args.url, args.calls, args.seconds, args.wav))
    sys.stdout.write(json.dumps(out) + "\n")


def start_callers(transport: str, srv, calls: int, seconds: float, tmp: Path) -> subprocess.Popen:
    if transport == "sip":
        from tests.support.sip_trace import Sipp
        from tests.support.sipp import SCENARIOS

        ulaw = tmp / "caller-ulaw.wav"
        if not ulaw.exists():
            write_wav(tmp / "caller8k.wav", 8000, seconds + 5)
            subprocess.run(["sox", str(tmp / "caller8k.wav"), "-e", "u-law", str(ulaw)], check=True)
        sipp = Sipp(srv.sip_port, SCENARIOS / "uac_call.xml", "1001", tmp,
                    {"@RTP_FILE@": str(ulaw), 'milliseconds="4000"': f'milliseconds="{int(seconds * 1000)}"'},
                    timeout=int(seconds) + 60, calls=calls)
        sipp.start()
        return sipp.proc
    rate = 48000 if transport == "webrtc" else 8000
    wav = tmp / f"caller{rate}.wav"
    if not wav.exists():  # as long as the call: a WebRTC caller's track ends with its file
        write_wav(wav, rate, seconds + 5)
    token = srv.twilio_token if transport == "twilio" else srv.telnyx_token
    cmd = [sys.executable, __file__, "--caller", transport, "--url", srv.ws_url if transport != "webrtc" else srv.url,
           "--token", token or "", "--calls", str(calls), "--seconds", str(seconds), "--wav", str(wav)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))


# ---- one transport's run -------------------------------------------------------------------------

def ends_of(srv, endpoint: str, skip: set[str]) -> list[dict]:
    return [ln for ln in srv.lines() if ln.get("event") == "call_end" and ln.get("endpoint") == endpoint
            and ln.get("call_id") not in skip]


def step_histogram(metrics: dict[str, float], name: str = "personaplex_engine_step_seconds") -> dict[float, float]:
    """A histogram's cumulative bucket counts {upper edge: count} (the engine step's by default)."""
    out = {}
    for sample, v in metrics.items():
        if sample.startswith(name + "_bucket{"):
            le = sample.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = v
    return out


ANSWERED = "personaplex_answer_to_first_audio_seconds_count"  # calls whose first agent frame went out

#: counters read over the steady window (the call_end totals include the calls' starts)
WINDOW_COUNTERS = {"drop_s": "personaplex_caller_audio_dropped_seconds_total",
                   "lost_s": "personaplex_caller_audio_lost_seconds_total",
                   "late": "personaplex_late_inbound_frames_total",
                   "overruns": "personaplex_engine_overruns_total",
                   "underruns": "personaplex_playout_underruns_total"}


def window_counts(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What each of WINDOW_COUNTERS grew by between two scrapes (all its labelled series)."""
    def total(m: dict[str, float], name: str) -> float:
        return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))
    return {key: round(total(after, name) - total(before, name), 3) for key, name in WINDOW_COUNTERS.items()}


TICK_LATE = "personaplex_tick_late_seconds"  # how late the engine thread woke for each tick


def step_quantiles(before: dict[float, float], after: dict[float, float]) -> tuple[int, float, float]:
    """(observations in the window, median, p99) in ms: the upper edge of the bucket each falls in."""
    edges = sorted(after)
    counts = [after[e] - before.get(e, 0.0) for e in edges]
    n = counts[-1] if counts else 0

    def q(f: float) -> float:
        for e, c in zip(edges, counts):
            if c >= f * n:
                return 1000 * e
        return float("inf")
    return int(n), q(0.5), q(0.99)


def run_transport(srv, transport: str, calls: int, seconds: float, tmp: Path, idle_pct: float) -> dict:
    from tests.support import poll
    from tests.support.server import scrape

    skip = {ln["call_id"] for ln in ends_of(srv, transport, set())}
    starts_before = len([ln for ln in srv.lines() if ln.get("event") == "call_start"])
    callers = start_callers(transport, srv, calls, seconds, tmp)
    # steady state: every call answered (its first agent frame out) and a second in; until a
    # few seconds before the first hang-up
    answered_before = scrape(srv).get(ANSWERED, 0.0)
    poll(lambda: len([ln for ln in srv.lines() if ln.get("event") == "call_start"]) - starts_before,
         lambda n: n >= calls, 60, step=0.2)
    poll(lambda: scrape(srv).get(ANSWERED, 0.0) - answered_before, lambda n: n >= calls, 60, step=0.2)
    time.sleep(1.0)
    server, caller = CpuWindow([srv.proc.pid]), CpuWindow([callers.pid])
    metrics0 = scrape(srv)
    server.start()
    caller.start()
    time.sleep(max(seconds - 5.0, 2.0))
    s, c = server.stop(), caller.stop()
    metrics1 = scrape(srv)
    steps = step_quantiles(step_histogram(metrics0), step_histogram(metrics1))
    tick_late = step_quantiles(step_histogram(metrics0, TICK_LATE), step_histogram(metrics1, TICK_LATE))
    window = window_counts(metrics0, metrics1)
    try:
        out, _ = callers.communicate(timeout=seconds + 90)
    except subprocess.TimeoutExpired:
        callers.kill()
        out = ""
    ends = poll(lambda: ends_of(srv, transport, skip), lambda e: len(e) >= calls, 30, step=0.2)
    expected = [e["duration_s"] / FRAME_S for e in ends]
    return {
        "transport": transport, "calls": len(ends), "server_pct": s["pct"],
        "per_call_pct": (s["pct"] - idle_pct) / max(len(ends), 1), "threads": s["threads"], "callers_pct": c["pct"],
        "frames_in": sum(e["frames_in"] for e in ends), "frames_expected": round(sum(expected)),
        "median_in_of_expected": statistics.median(e["frames_in"] / max(x, 1) for e, x in zip(ends, expected)),
        "late": sum(e.get("late_frames", 0) for e in ends),
        "underruns": sum(e.get("playout_underruns", 0) for e in ends),
        "dropped_s": round(sum(e.get("caller_audio_dropped_s", 0) for e in ends), 3),
        "lost_s": round(sum(e.get("caller_audio_lost_s", 0) for e in ends), 3) if ends and "caller_audio_lost_s" in ends[0] else None,
        "reasons": sorted({e["reason"] for e in ends}),
        "steps": steps,
        "tick_late": tick_late,
        "window": window,
        "callers_out": (out or "")[-300:] if transport != "sip" else "",
        "call_ends": ends,  # every call's `call_end` line (--json)
    }


def print_row(tree: str, r: dict) -> None:
    lost = "n/a" if r["lost_s"] is None else f"{r['lost_s']:.2f}"
    print(f"{tree:>8} {r['transport']:>7} {r['calls']:>5} {r['server_pct']:>7.1f} {r['per_call_pct']:>8.2f} "
          f"{r['callers_pct']:>8.1f} {r['frames_in']:>6}/{r['frames_expected']:<6} {r['median_in_of_expected']:>6.3f} "
          f"{r['late']:>5} {r['underruns']:>6} {r['dropped_s']:>7.2f} {lost:>6}  {','.join(r['reasons'])}")
    top = sorted(r["threads"].items(), key=lambda kv: -kv[1])[:6]
    print(" " * 17 + "threads: " + ", ".join(f"{k} {v:.1f}%" for k, v in top))
    n, p50, p99 = r["steps"]
    print(" " * 17 + f"engine step: median <= {p50:.0f} ms, p99 <= {p99:.0f} ms ({n} steps)")
    if r["tick_late"][0]:  # a tree that has the histogram
        n, p50, p99 = r["tick_late"]
        print(" " * 17 + f"tick woke late: median <= {p50:.1f} ms, p99 <= {p99:.1f} ms ({n} ticks; "
              f"idle server: {r['idle_tick_late'][1]:.1f} / {r['idle_tick_late'][2]:.1f} ms)")
    w = r["window"]
    print(" " * 17 + f"steady window: dropped {w['drop_s']:.2f} s, lost {w['lost_s']:.2f} s, late frames "
          f"{w['late']:.0f}, engine overruns {w['overruns']:.0f}, playout underruns {w['underruns']:.0f}")


def bench_tree(name: str, tree: Path, args, tmp: Path) -> list[dict]:
    from agent.model.demo import default_cache_dir
    from tests.support.server import ServerProcess, scrape

    d = tmp / name
    d.mkdir()
    enabled = set(args.transports)
    srv = ServerProcess(d, default_cache_dir(), {
        "engine": {"max_calls": args.calls, "max_call_seconds": None},
        "sip": {"enabled": "sip" in enabled, "rtp_port": 24000,
                **({"codecs": args.sip_codecs.split(",")} if args.sip_codecs else {})},
        "twilio": {"enabled": "twilio" in enabled, "allow_unsigned": False},
        "telnyx": {"enabled": "telnyx" in enabled},
        "logging": {"format": "json", "level": "info"},
    }, env={"PYTHONPATH": str(tree)}, **({} if args.model == "demo" else
                                         {"module": "tests.support.fake_server", "args": ["--mode", "echo"]}))
    rows = []
    try:
        srv.wait_ready(180)
        idle = CpuWindow([srv.proc.pid])
        m0 = scrape(srv)
        idle.start()
        time.sleep(8)  # 100 ticks: how late the engine wakes with no call up
        idle_pct = idle.stop()["pct"]
        idle_late = step_quantiles(step_histogram(m0, TICK_LATE), step_histogram(scrape(srv), TICK_LATE))
        print(f"{name:>8}    idle server {idle_pct:.1f}% of a core ({tree})", flush=True)
        for t in args.transports:
            r = dict(run_transport(srv, t, args.calls, args.seconds, d, idle_pct), idle_tick_late=idle_late)
            print_row(name, r)
            rows.append(r)
            sys.stdout.flush()
    finally:
        srv.stop(check_log=False, expect_exit=None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--transports", default="sip,twilio,telnyx,webrtc")
    ap.add_argument("--tree", action="append", default=[], help="NAME=PATH: the server from this checkout")
    ap.add_argument("--model", choices=("echo", "demo"), default="echo",
                    help="echo: the model replaced by an echo; demo: the real server, tiny demo model")
    ap.add_argument("--sip-codecs", help="the server's sip.codecs, comma-separated (PCMU/8000: an 8 kHz bridge)")
    ap.add_argument("--json", help="write the rows here too, with every call's call_end line")
    # caller mode (internal): this script as the callers' own process
    ap.add_argument("--caller", choices=("twilio", "telnyx", "webrtc"), help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--token", help=argparse.SUPPRESS)
    ap.add_argument("--wav", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.caller:
        return caller_main(args)
    args.transports = [t for t in args.transports.split(",") if t]
    unknown = set(args.transports) - set(TRANSPORTS)
    if unknown:
        sys.exit(f"unknown transports {sorted(unknown)} (of {TRANSPORTS})")
    for tool in (["sipp", "sox"] if "sip" in args.transports else []):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed (scripts/setup.sh installs it)")
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in args.tree] or [("this", ROOT)]
    print(f"{os.cpu_count()} cores; {args.calls} calls per transport, {args.seconds:.0f} s each; {args.model} model")
    print(f"{'tree':>8} {'trans.':>7} {'calls':>5} {'server%':>7} {'%/call':>8} {'callers%':>8} "
          f"{'frames in/expected':>13} {'median':>6} {'late':>5} {'underr':>6} {'drop_s':>7} {'lost_s':>6}  reasons")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, tree in trees:
            rows += [dict(r, tree=name) for r in bench_tree(name, tree, args, Path(d))]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
