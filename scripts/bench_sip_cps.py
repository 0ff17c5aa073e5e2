#!/usr/bin/env python3
"""SIP calls per second (signalling only, sipp): set-up + tear-down through the real server.

Each call is answered once its first agent frame exists (its prompt prefilled in one forward,
a frame or two), then hung up at once. Prints, per offered rate: completed calls per second, calls refused busy (486),
and sipp's median response time to 200 OK.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from tests.support import free_port
    from tests.support.server import ServerProcess, http_text

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rates", default="5,10,20,40")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--max-calls", type=int, default=8)
    args = ap.parse_args()
    if not shutil.which("sipp"):
        sys.exit("sipp (Debian sip-tester) is needed")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        from agent.model.demo import default_cache_dir

        srv = ServerProcess(tmp, default_cache_dir(), {
            "engine": {"max_calls": args.max_calls, "barge_in": {"enabled": False}},
            "sip": {"enabled": True, "rtp_port": 25000}, "logging": {"format": "json", "level": "warning"}})
        srv.wait_ready(180)
        print(f"server: max_calls {args.max_calls}, demo model on CPU; {args.seconds:.0f} s per rate")
        print(f"{'offered/s':>9} {'answered/s':>10} {'busy 486/s':>10} {'failed':>6}")
        busy_before = 0
        for rate in [float(r) for r in args.rates.split(",")]:
            n = int(rate * args.seconds)
            stat = tmp / f"stat{rate}.csv"
            t0 = time.monotonic()
            subprocess.run(["sipp", f"127.0.0.1:{srv.sip_port}", "-sf", str(ROOT / "tests/e2e/sipp/uac_short.xml"),
                            "-s", "1001", "-r", str(rate), "-m", str(n), "-i", "127.0.0.1",
                            "-p", str(free_port(socket.SOCK_DGRAM)), "-mp", str(free_port(socket.SOCK_DGRAM)),
                            "-timeout", f"{int(args.seconds * 4 + 20)}s", "-nostdin", "-trace_stat",
                            "-stf", str(stat), "-fd", "1"], cwd=tmp, capture_output=True, timeout=args.seconds * 4 + 60)
            elapsed = time.monotonic() - t0
            rows = stat.read_text().splitlines() if stat.exists() else []
            head = rows[0].split(";") if rows else []
            last = rows[-1].split(";") if rows else []
            get = (lambda k: int(last[head.index(k)]) if k in head else 0)
            ok, failed = get("SuccessfulCall(C)"), get("FailedCall(C)")
            metrics = http_text(srv.ops_url + "/metrics")
            m = re.search(r'personaplex_calls_total\{endpoint="sip",outcome="refused_busy"\} ([0-9.]+)', metrics)
            busy_total = int(float(m.group(1))) if m else 0
            busy = busy_total - busy_before
            busy_before = busy_total
            print(f"{rate:9.0f} {(ok - busy) / elapsed:10.1f} {busy / elapsed:10.1f} {failed:6d}", flush=True)
        srv.stop()


if __name__ == "__main__":
    main()
