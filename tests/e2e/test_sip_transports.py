"""SIP beyond the defaults, with real peers: a call over TCP (sipp -t t1), TLS on an explicit
`sip.tls_port` (a pjsua2 caller), `sip.busy_code: 503` with Retry-After, and the order of
180 Ringing and 200 OK around the call's first agent frame.

One server serves the module: one call slot, UDP+TCP+TLS, busy code 503, voices loaded on first
use (`engine.prewarm: false`), and a persona whose voice is a long custom wav: its first call
encodes the wav before its first frame exists, so its ringing lasts long enough to be measured.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import components_fixture, free_port, poll, ROOT, rtp_ports, speech_wav, speechlike
from tests.support.server import (settles_calls_of, ServerProcess, call_end_of, ended, http_json, metric,
                                  no_calls)
from tests.support.sip_trace import parse_trace
from tests.support.sip_trace import sipp as run_sipp

SCENARIOS = Path(__file__).parent / "sipp"
SIP_CLIENT = Path(__file__).resolve().parents[1] / "support" / "sip_client.py"
RETRY_AFTER = 7


components = components_fixture("pjsua2", "sipp", "espeak-ng", "sox")


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    d = tmp_path_factory.mktemp("transportaudio")
    wav16 = speech_wav(d / "caller16.wav", "Hello, my name is Omar Torres, when is my next pickup?", 16000)
    ulaw = d / "caller_ulaw.wav"
    subprocess.run(["sox", str(wav16), "-r", "8000", "-c", "1", "-e", "u-law", str(ulaw)], check=True)
    return {"wav16": wav16, "ulaw": ulaw}


@pytest.fixture(scope="module")
def edge(tmp_path_factory, demo_dir):
    import sphn

    from server.tls import self_signed

    tmp = tmp_path_factory.mktemp("sipedge")
    cert, key = self_signed(tmp / "tls")
    slow_voice = tmp / "slow-voice.wav"
    sphn.write_wav(str(slow_voice), speechlike(30.0, 5), 24000)  # 375 frames to Mimi-encode first
    personas = tmp / "personas"
    personas.mkdir()
    for name in ("citysan.yaml", "teacher.yaml"):
        (personas / name).write_text((ROOT / "personas" / name).read_text())
    (personas / "slow-start.yaml").write_text(
        f"kind: assistant\nnumbers: ['1020']\nrole: a patient receptionist\nvoice: {json.dumps(str(slow_voice))}\n")
    # an explicit TLS port that is not the default (SIP port + 1)
    sip_port = free_port(socket.SOCK_DGRAM)
    tls_port = free_port()
    while tls_port == sip_port + 1:
        tls_port = free_port()
    srv = ServerProcess(tmp, demo_dir.parent, {
        "engine": {"max_calls": 1, "retry_after_s": RETRY_AFTER, "prewarm": False},
        "personas": {"unknown_numbers": "refuse"},
        "sip": {"enabled": True, "port": sip_port, "transports": ["udp", "tcp", "tls"], "tls_port": tls_port,
                "tls_cert_file": str(cert), "tls_key_file": str(key), "busy_code": 503, "rtp_port": rtp_ports()},
        "media_timeout_s": 5,
    })
    srv.sip_port, srv.tls_port = sip_port, tls_port  # the overrides won over the port it picked
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


calls_settle = settles_calls_of("edge")



def client_summary(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.startswith('{"answered"')]
    assert lines, stdout[-4000:]
    return json.loads(lines[-1])


def test_call_over_tcp(edge, audio, tmp_path):
    before = ended(edge)
    rc, msgs = run_sipp(edge.sip_port, SCENARIOS / "uac_call.xml", "1001", tmp_path,
                        {"@RTP_FILE@": str(audio["ulaw"])}, extra=["-t", "t1"])
    assert rc == 0, msgs[-3000:]
    trace = parse_trace(msgs)
    assert trace and {m.transport for m in trace} == {"TCP"}, {m.transport for m in trace}
    ok = next(m for m in trace if not m.sent and m.is_response(200, 1))
    assert ok.header("Via").startswith("SIP/2.0/TCP"), ok.text
    assert no_calls(edge)
    end = call_end_of(edge, before, "1001")
    assert end["reason"] == "caller_hangup" and end["frames_in"] > 30 and end["caller_peak"] > 0.05, end


def test_tls_on_the_configured_tls_port(edge, audio, tmp_path):
    before = ended(edge)
    uri = f"sip:1001@127.0.0.1:{edge.tls_port};transport=tls"
    res = subprocess.run([sys.executable, str(SIP_CLIENT), uri, str(audio["wav16"]), str(tmp_path / "tls.wav"),
                          "--seconds", "2", "--tls"], capture_output=True, text=True, timeout=60)
    summary = client_summary(res.stdout)
    assert summary["answered"] and summary["media_active"], summary
    assert no_calls(edge)
    end = call_end_of(edge, before, "1001")
    assert end["reason"] == "caller_hangup" and end["frames_in"] > 10 and end["caller_peak"] > 0.05, end


def test_busy_code_503_with_retry_after(edge, audio, tmp_path):
    busy = 'personaplex_calls_total{endpoint="sip",outcome="refused_busy"}'
    busy_before = metric(edge, busy)
    holder = subprocess.Popen([sys.executable, str(SIP_CLIENT), f"sip:1001@127.0.0.1:{edge.sip_port}",
                               str(audio["wav16"]), str(tmp_path / "h.wav"), "--seconds", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert poll(lambda: http_json(edge.ops_url + "/api/calls")[1]["calls"], bool, 15, step=0.1)
        rc, msgs = run_sipp(edge.sip_port, SCENARIOS / "uac_expect.xml", "1001", tmp_path,
                            {"@CODE@": "503", "@HEADER@": "Retry-After",
                             "@HEADER_RE@": f"Retry-After: *{RETRY_AFTER}"})
        assert rc == 0, msgs[-3000:]
        (final,) = [m for m in parse_trace(msgs) if not m.sent and m.status and m.status >= 200]
        assert final.status == 503 and final.header("Retry-After") == str(RETRY_AFTER), final.text
    finally:
        out, _ = holder.communicate(timeout=60)
    assert client_summary(out)["answered"]
    assert metric(edge, busy) == busy_before + 1
    assert no_calls(edge)


def test_ringing_until_the_first_agent_frame_then_200(edge):
    """180 Ringing strictly before 200 OK, and 200 OK only once the call's first agent frame
    exists, as the caller sees it: the agent's first sound reaches the caller's RTP port right
    after the 200, not later. The persona's voice is a 30 s wav encoded on its first call, so the
    first frame comes well after the INVITE: a 200 sent before it would be followed by silence
    for that long. The caller is a hand-made UDP dialog whose SDP names an RtpTap's port (which
    notes when the agent's packets arrive), its answers timed on the same clock."""
    import uuid

    from tests.support.rtp_tap import RtpTap
    from tests.support.sipp import UdpDialog, sdp

    before = ended(edge)
    tap, dlg = RtpTap(), UdpDialog(edge.sip_port)
    try:
        dlg.send(dlg.invite("1020", "application/sdp", sdp().replace("m=audio 40000 ", f"m=audio {tap.port} ")))
        answer = dlg.final("1 INVITE", timeout=30)
        assert answer is not None and answer.startswith("SIP/2.0 200"), (answer, dlg.received)
        dlg.send(dlg.in_dialog("ACK", 1, answer, "z9hG4bK" + uuid.uuid4().hex[:12]))
        # 3 s of the call (150 packets of 20 ms), then the caller hangs up
        poll(lambda: len(tap.packets), lambda n: n >= 150, 10, step=0.05)
        dlg.send(dlg.in_dialog("BYE", 2, answer, "z9hG4bK" + uuid.uuid4().hex[:12]))
        assert (dlg.final("2 BYE") or "").startswith("SIP/2.0 200")
        first_sound, first_packet = tap.first_sound(), tap.first_packet()
    finally:
        tap.close()
        dlg.close()
    t180 = next((t for t, line in dlg.received if line.startswith("SIP/2.0 180")), None)
    t200 = next(t for t, line in dlg.received if line.startswith("SIP/2.0 200"))
    assert t180 is not None and t180 < t200, dlg.received
    assert t200 - t180 > 0.25, (t200 - t180)  # a long ring: the voice was being encoded
    assert first_sound is not None, f"no agent sound reached the caller ({len(tap.packets)} packets)"
    assert first_packet >= t200 - 0.02, (first_packet - t200)  # no media before the answer
    # answered only once the frame existed: its sound follows the 200 within a few packets (a
    # 200 sent before it would be followed by silence as long as the ring); a loaded machine's
    # jitter is allowed up to half the ring, never the ring itself
    assert first_sound - t200 < max(0.15, 0.5 * (t200 - t180)), (first_sound - t200, t200 - t180)
    end = call_end_of(edge, before, "1020")
    assert end["persona"] == "slow-start" and end["reason"] == "caller_hangup", end
    assert end["frames_out"] > 30
