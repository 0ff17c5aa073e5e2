"""Drain over SIP: SIGTERM with a call up. New INVITEs get 503 (with Retry-After) while the call
goes on; at `drain_timeout_s` the agent hangs the call up itself (BYE), then exits 0."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import components_fixture, poll, rtp_ports, speech_wav
from tests.support.server import ServerProcess, http_json, metric
from tests.support.sip_trace import Sipp, parse_trace, sipp

SCENARIOS = Path(__file__).parent / "sipp"
DRAIN_S = 4.0


components = components_fixture("pjsua2", "sipp", "espeak-ng", "sox")


@pytest.fixture(scope="module")
def ulaw(tmp_path_factory):
    d = tmp_path_factory.mktemp("drainaudio")
    wav = speech_wav(d / "caller8k.wav", "Hello, my name is Omar Torres, when is my next pickup?", 8000)
    out = d / "caller_ulaw.wav"
    subprocess.run(["sox", str(wav), "-e", "u-law", str(out)], check=True)
    return out


@pytest.mark.slow
def test_sigterm_refuses_new_invites_and_hangs_up_the_live_call_at_the_drain_timeout(tmp_path, demo_dir, ulaw):
    srv = ServerProcess(tmp_path, demo_dir.parent, {
        "engine": {"max_calls": 2, "retry_after_s": 9},
        "drain_timeout_s": DRAIN_S,
        "sip": {"enabled": True, "rtp_port": rtp_ports()},
        "media_timeout_s": 30,
    })
    live = Sipp(srv.sip_port, SCENARIOS / "uac_until_bye.xml", "1001", tmp_path, {"@RTP_FILE@": str(ulaw)},
                timeout=90)
    try:
        srv.wait_ready()
        live.start()
        calls = poll(lambda: http_json(srv.ops_url + "/api/calls")[1]["calls"],
                     lambda c: len(c) == 1 and c[0]["state"] == "live" and c[0]["frames_in"] > 10, 20)
        assert len(calls) == 1 and calls[0]["frames_in"] > 10, calls  # up, and the caller's audio flows
        frames_at_signal = calls[0]["frames_in"]
        t_signal = time.time()
        srv.proc.send_signal(signal.SIGTERM)
        status, ready = poll(lambda: http_json(srv.ops_url + "/readyz"), lambda r: r[1].get("draining"), 10)
        assert status == 503 and ready["draining"], ready
        # a new INVITE while the call is up: 503 with Retry-After, and nothing else happens to it
        refused_before = metric(srv, 'personaplex_calls_total{endpoint="sip",outcome="refused_draining"}')
        rc, msgs = sipp(srv.sip_port, SCENARIOS / "uac_expect.xml", "1002", tmp_path,
                        {"@CODE@": "503", "@HEADER@": "Retry-After", "@HEADER_RE@": "Retry-After: *9"}, timeout=15)
        assert rc == 0, msgs[-3000:]
        assert metric(srv, 'personaplex_calls_total{endpoint="sip",outcome="refused_draining"}') \
            == refused_before + 1
        assert [c["call_id"] for c in http_json(srv.ops_url + "/api/calls")[1]["calls"]] == [calls[0]["call_id"]]
        # the live call runs until the drain timeout, then the agent hangs up (BYE)
        rc, msgs = live.wait()
        trace = parse_trace(msgs)
        assert rc == 0, (live.output[-2000:], [m.first_line for m in trace])
        (bye,) = [m for m in trace if not m.sent and m.method == "BYE"]
        assert bye.t - t_signal >= DRAIN_S - 0.25, bye.t - t_signal  # not before the drain timeout
        assert srv.proc.wait(30) == 0  # drained: exit 0
    finally:
        live.kill()
        srv.stop()
    (end,) = [ln for ln in srv.lines() if ln.get("event") == "call_end"]
    assert end["reason"] == "shutdown" and end["endpoint"] == "sip", end
    # the caller's audio kept reaching the model during the drain (about 4 s: 50 frames)
    assert end["frames_in"] >= frames_at_signal + 25, (frames_at_signal, end)
    assert end["duration_s"] >= DRAIN_S - 0.25
