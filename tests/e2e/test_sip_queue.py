"""The call queue over SIP (issue 23): with 2 slots and `queue.max_waiting: 2`, a third and a
fourth caller wait on hold (183 with early media, or 200 at once) and are answered in order as
the slots free; a fifth is refused busy. The fourth caller is a real pjsua2 phone that records
what it hears: the hold chime, before the agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support import components_fixture, poll, speech_wav, rtp_ports
from tests.support.server import ServerProcess, http_json, metric
from tests.support.sip_trace import Sipp, log_time, sip_options

SCENARIOS = Path(__file__).parent / "sipp"
CLIENT = Path(__file__).parents[1] / "support" / "sip_client.py"


components = components_fixture("pjsua2", "sipp", "espeak-ng", "sox")


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    d = tmp_path_factory.mktemp("queueaudio")
    wav8 = speech_wav(d / "caller8k.wav", "Hello, I am calling about my pickup next week.", 8000)
    ulaw = d / "caller_ulaw.wav"
    subprocess.run(["sox", str(wav8), "-e", "u-law", str(ulaw)], check=True)
    wav16 = speech_wav(d / "caller16k.wav", "Hello, I am calling about my pickup next week.", 16000)
    return ulaw, wav16


def _queue_depth(srv) -> float:
    return metric(srv, "personaplex_queue_depth")


def _first(trace, pred):
    return next(m for m in trace if pred(m))


def _hold_chime(recording: Path, seconds: float) -> tuple[float, float]:
    """(rms, dominant frequency in Hz) of the first `seconds` of what the phone heard."""
    import sphn

    pcm, sr = sphn.read(str(recording))
    x = np.asarray(pcm, dtype=np.float64)[0][: int(seconds * sr)]
    spec = np.abs(np.fft.rfft(x))
    freqs = np.fft.rfftfreq(len(x), 1 / sr)
    return float(np.sqrt(np.mean(x ** 2))), float(freqs[int(np.argmax(spec[1:])) + 1])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["early_media", "answer"])
def test_third_and_fourth_callers_wait_on_hold_and_are_answered_in_order_fifth_is_refused(
        tmp_path, demo_dir, audio, mode):
    ulaw, wav16 = audio
    srv = ServerProcess(tmp_path, demo_dir.parent, {
        "engine": {"max_calls": 2, "retry_after_s": 7},
        "sip": {"enabled": True, "rtp_port": rtp_ports()}, "media_timeout_s": 30,
        "queue": {"max_waiting": 2, "max_wait_s": 60, "sip_answer": mode},
        "recording": {"enabled": True, "dir": str(tmp_path / "rec")},
    })
    early = mode == "early_media"

    def caller(number: str, pause_ms: int, queued: bool) -> Sipp:
        return Sipp(srv.sip_port, SCENARIOS / "uac_queue.xml", number, tmp_path,
                    {"@RTP_FILE@": str(ulaw), "@PAUSE@": str(pause_ms),
                     "@OPT183@": "false" if (queued and early) else "true"}, timeout=60)

    # the third caller talks 2 s once answered (early media); answered at once ("answer"), it
    # stays on the line through its wait (about 3 s) and talks about 3 s more
    a, b, c = (caller("1001", 3000, False), caller("1002", 6000, False),
               caller("1003", 2000 if early else 6000, True))
    phone = None
    try:
        srv.wait_ready()
        a.start()
        b.start()
        poll(lambda: http_json(srv.ops_url + "/api/calls")[1]["calls"],
             lambda calls: len(calls) == 2 and all(x["state"] == "live" for x in calls), 30)
        # both slots busy, queue empty: still ready (a caller would wait), and so says the proxy's probe
        status, ready = http_json(srv.ops_url + "/readyz")
        assert status == 200 and ready["capacity_left"] == 0, ready
        probe_uri = f"sip:agent@127.0.0.1:{srv.sip_port}"
        assert sip_options(srv.sip_port, probe_uri) == "SIP/2.0 200 OK"
        c.start()
        assert poll(lambda: _queue_depth(srv), lambda d: d == 1, 10) == 1
        out = tmp_path / "phone.wav"
        phone = subprocess.Popen([sys.executable, str(CLIENT), f"sip:1004@127.0.0.1:{srv.sip_port}", str(wav16),
                                  str(out), "--seconds", "2" if early else "12"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert poll(lambda: _queue_depth(srv), lambda d: d == 2, 10) == 2
        # slots and queue full: not ready, and a fifth caller is refused busy with Retry-After
        status, ready = http_json(srv.ops_url + "/readyz")
        assert status == 503 and ready["queue_waiting"] == 2, ready
        assert sip_options(srv.sip_port, probe_uri) == "SIP/2.0 503 Full"
        e = Sipp(srv.sip_port, SCENARIOS / "uac_expect.xml", "1005", tmp_path,
                 {"@CODE@": "486", "@HEADER@": "Retry-After", "@HEADER_RE@": "Retry-After: *7"}, timeout=15)
        rc, msgs = e.start().wait()
        assert rc == 0, msgs[-3000:]
        for s in (a, b, c):
            rc, msgs = s.wait()
            assert rc == 0, msgs[-3000:]
        stdout, stderr = phone.communicate(timeout=60)
        result = json.loads(stdout.strip().splitlines()[-1])
        assert result["answered"] and result["media_active"], (result, stderr[-2000:])
        assert metric(srv, 'personaplex_queue_outcomes_total{endpoint="sip",outcome="answered"}') == 2
        assert metric(srv, 'personaplex_calls_total{endpoint="sip",outcome="refused_busy"}') == 1
        assert metric(srv, 'personaplex_queue_wait_seconds_count{outcome="answered"}') == 2
        assert _queue_depth(srv) == 0
    finally:
        for s in (a, b, c):
            s.kill()
        if phone is not None and phone.poll() is None:
            phone.kill()
        srv.stop()

    # the third caller: 183 with an SDP (early media) while on hold, 200 only after the first
    # caller's slot freed (its BYE)
    a_bye = _first(a.trace, lambda m: m.sent and m.method == "BYE").t
    c_trace = c.trace
    c_ok = _first(c_trace, lambda m: not m.sent and m.status == 200 and "INVITE" in (m.header("CSeq") or ""))
    if early:
        progress = _first(c_trace, lambda m: not m.sent and m.status == 183)
        assert "m=audio" in progress.body and progress.t < a_bye, progress.head
        assert c_ok.t >= a_bye, (c_ok.t, a_bye)
        print(f"\n[{mode}] slot freed (BYE sent) -> queued caller's 200 OK (its first agent frame): "
              f"{(c_ok.t - a_bye) * 1000:.0f} ms")
    else:
        assert c_ok.t < a_bye  # answered at once, then on hold
    # answered in order: the server took the third caller off the queue before the fourth
    lines = srv.lines()
    dequeued = [x for x in lines if x.get("event") == "call_dequeued"]
    assert [x["number"] for x in dequeued] == ["1003", "1004"], dequeued
    ends = {x["number"]: x for x in lines if x.get("event") == "call_end"}
    assert "queue_wait_s" not in ends["1001"] and "queue_wait_s" not in ends["1002"]
    assert ends["1003"]["queue_wait_s"] > 1.0 and ends["1004"]["queue_wait_s"] > ends["1003"]["queue_wait_s"]
    # the fourth caller took the next slot that freed (the second caller's or the third's)
    next_free = min(log_time(ends["1002"]), log_time(ends["1003"]))
    assert log_time(dequeued[1]) >= next_free - 0.5, (dequeued[1], ends["1002"], ends["1003"])
    # the caller's audio reached the model once answered (frames in), and the record has the wait
    assert ends["1003"]["frames_in"] > 10 and ends["1004"]["frames_in"] > 10
    records = [json.loads(p.read_text()) for p in (tmp_path / "rec").glob("*.json")]
    waits = sorted(r["queue_wait_s"] or 0 for r in records)
    assert len(records) == 4 and waits[:2] == [0, 0] and waits[2] > 1.0, waits
    # the fourth caller (a real phone) heard the soft hold chime first (523 Hz, then 659 Hz)
    rms, peak = _hold_chime(out, 0.9)
    assert rms > 0.01 and 480 < peak < 700, (rms, peak)


@pytest.mark.slow
def test_held_callers_time_out_abandon_and_are_refused_503_on_sigterm(tmp_path, demo_dir, audio):
    """One slot, busy: a caller over `max_wait_s` gets the busy answer after its 183 (a Twilio
    stream: hold audio, then closed 1013); one who hangs up on hold (CANCEL) leaves the queue at
    once, counted abandoned; at SIGTERM a caller on hold gets 503 with Retry-After while the live
    call drains as before."""
    import asyncio
    import signal
    import time

    ulaw, _ = audio
    srv = ServerProcess(tmp_path, demo_dir.parent, {
        "engine": {"max_calls": 1, "retry_after_s": 7},
        "drain_timeout_s": 3,
        "sip": {"enabled": True, "rtp_port": rtp_ports()}, "media_timeout_s": 30,
        "twilio": {"enabled": True},
        "queue": {"max_waiting": 2, "max_wait_s": 3},
    })
    live = Sipp(srv.sip_port, SCENARIOS / "uac_until_bye.xml", "1001", tmp_path, {"@RTP_FILE@": str(ulaw)},
                timeout=90)
    try:
        srv.wait_ready()
        live.start()
        poll(lambda: http_json(srv.ops_url + "/api/calls")[1]["calls"],
             lambda calls: len(calls) == 1 and calls[0]["state"] == "live", 30)
        # over max_wait_s: 183, then the busy answer (486, Retry-After) after about 3 s
        timed = Sipp(srv.sip_port, SCENARIOS / "uac_held_refused.xml", "1002", tmp_path,
                     {"@CODE@": "486", "@HEADER@": "Retry-After", "@HEADER_RE@": "Retry-After: *7"}, timeout=20)
        rc, msgs = timed.start().wait()
        assert rc == 0, msgs[-3000:]
        trace = timed.trace
        held_s = _first(trace, lambda m: not m.sent and m.status == 486).t - _first(trace, lambda m: m.sent).t
        assert 2.5 < held_s < 8, held_s
        assert metric(srv, 'personaplex_queue_outcomes_total{endpoint="sip",outcome="timed_out"}') == 1
        # a carrier stream over max_wait_s: hold audio, then closed 1013 (try again later)
        waiter = srv.twilio_caller(parameters={"to": "+14155550100", "from": "+14155550009"})
        t0 = time.monotonic()
        asyncio.new_event_loop().run_until_complete(asyncio.wait_for(waiter.run(12.0), 20))
        held_s = time.monotonic() - t0
        assert waiter.closed_by_server and waiter.close_code == 1013, waiter.close_code
        assert 2.5 < held_s < 8, held_s
        assert waiter.agent_media and all(m.samples == 320 for m in waiter.agent_media)  # hold audio, 40 ms
        assert not waiter.marks_received  # nothing of the agent's
        assert metric(srv, 'personaplex_queue_outcomes_total{endpoint="twilio",outcome="timed_out"}') == 1
        # hangs up on hold: CANCEL answered (200, 487), out of the queue at once
        rc, msgs = Sipp(srv.sip_port, SCENARIOS / "uac_cancel.xml", "1003", tmp_path,
                        {'<recv response="180"/>': '<recv response="183"/>'}, timeout=15).start().wait()
        assert rc == 0, msgs[-3000:]
        assert poll(lambda: metric(srv, 'personaplex_queue_outcomes_total{endpoint="sip",outcome="abandoned"}'),
                    lambda v: v == 1, 5) == 1
        assert _queue_depth(srv) == 0
        # SIGTERM with a caller on hold: 503 + Retry-After at once; the live call drains
        held = Sipp(srv.sip_port, SCENARIOS / "uac_held_refused.xml", "1004", tmp_path,
                    {"@CODE@": "503", "@HEADER@": "Retry-After", "@HEADER_RE@": "Retry-After: *7"}, timeout=20)
        held.start()
        assert poll(lambda: _queue_depth(srv), lambda d: d == 1, 10) == 1
        srv.proc.send_signal(signal.SIGTERM)
        rc, msgs = held.wait()
        assert rc == 0, msgs[-3000:]
        rc, msgs = live.wait()
        assert rc == 0, msgs[-3000:]  # the live call got its BYE at the drain timeout
        assert srv.proc.wait(30) == 0  # then the server exits by itself (stop() checks its log)
    finally:
        live.kill()
        srv.stop()
    assert not any(x.get("event") == "call_dequeued" for x in srv.lines())
