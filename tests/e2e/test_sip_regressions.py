"""SIP input that once took the whole server down (found by the hostile-input sweep)."""

from __future__ import annotations

import uuid

import pytest

from tests.support import poll, require, rtp_ports
from tests.support.server import ServerProcess, http_json, no_calls, pinned_model, server_env
from tests.support.sipp import UdpDialog, invite, raw_sip, sdp


@pytest.fixture(scope="module")
def sip_agent(tmp_path_factory, demo_dir):
    require("pjsua2")
    srv = ServerProcess(tmp_path_factory.mktemp("sipreg"), demo_dir.parent, {
        "engine": {"max_calls": 2}, "personas": {"unknown_numbers": "refuse"},
        "sip": {"enabled": True, "rtp_port": rtp_ports()}})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.mark.parametrize("number, ctype, final", [
    ("5559999", "application/sdp", 404),  # late offer to a number no persona takes: used to abort pjsua
    ("5559999", "application/s", 404),  # truncated content type
    ("1001", "application/sdp", 200),  # late offer, taken: the agent offers in the 200, the ACK answers
], ids=["late-offer-refused", "bad-content-type-refused", "late-offer-taken"])
def test_an_invite_without_an_offer_is_answered_and_the_server_stays_up(sip_agent, number, ctype, final):
    dlg = UdpDialog(sip_agent.sip_port)
    try:
        dlg.send(dlg.invite(number, ctype))
        answer = dlg.final("1 INVITE")
        assert answer is not None, "no final answer to the INVITE"
        code = int(answer.split(" ", 2)[1])
        assert code == final, answer[:600]
        if code == 200:
            # the agent's offer is in the 200; the ACK carries the caller's answer: the call is up
            assert "application/sdp" in answer and "\r\nm=audio " in answer, answer
            dlg.send(dlg.in_dialog("ACK", 1, answer, "z9hG4bK" + uuid.uuid4().hex[:12], sdp()))
            calls = poll(lambda: http_json(sip_agent.ops_url + "/api/calls")[1]["calls"],
                         lambda c: any(x["state"] == "live" for x in c), 10)
            assert [c["number"] for c in calls if c["endpoint"] == "sip"] == ["1001"], calls
            dlg.send(dlg.in_dialog("BYE", 2, answer, "z9hG4bK" + uuid.uuid4().hex[:12]))
            bye = dlg.final("2 BYE")
            assert bye is not None and bye.startswith("SIP/2.0 200"), bye
            assert no_calls(sip_agent), "the call did not end with the BYE"
        else:
            dlg.send(dlg.in_dialog("ACK", 1, answer, dlg.branch))  # a refusal's ACK: same transaction
    finally:
        dlg.close()
    # the server is still there, and still takes a proper call's INVITE
    assert poll(lambda: sip_agent.proc.poll(), lambda rc: rc is None, 1.5) is None
    assert http_json(sip_agent.url + "/healthz")[0] == 200
    assert raw_sip(sip_agent.sip_port, invite(["Content-Type: application/sdp"], sdp(), number="5559999")) \
        == "SIP/2.0 100 Trying"


def test_a_taken_sip_port_stops_the_start_with_its_reason_and_exit_1(tmp_path, demo_dir):
    """Found in the scale-out test (an agent restarted on a port another process had just
    taken): the start failed as it should, then the process aborted in native destructors
    (exit -6/-11) and the reason was buried under the crash."""
    import json
    import socket
    import subprocess
    import sys

    from tests.support import ROOT

    require("pjsua2")
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    cfg = tmp_path / "server.yaml"
    cfg.write_text(json.dumps({"http": {"port": 0}, "ops": {"port": 0}, "engine": {"prewarm": False},
                               "model": pinned_model(demo_dir.parent),
                               "sip": {"enabled": True, "host": "127.0.0.1", "port": port}}))
    try:
        out = subprocess.run([sys.executable, "-m", "server", "serve", "--config", str(cfg)], cwd=ROOT,
                             capture_output=True, text=True, timeout=180, env=server_env(demo_dir.parent))
    finally:
        taken.close()
    assert out.returncode == 1, out.stderr[-3000:]
    lines = [json.loads(ln) for ln in out.stdout.splitlines() + out.stderr.splitlines() if ln.startswith("{")]
    (failed,) = [ln for ln in lines if ln.get("event") == "start_failed"]
    assert f"SIP endpoint failed to start on 127.0.0.1:{port}" in failed["error"]
    assert "Address already in use" in failed["error"]
