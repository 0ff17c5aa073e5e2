"""SIP input that once took the whole server down (found by the hostile-input sweep)."""

from __future__ import annotations

import pytest

from tests.support import poll, require
from tests.support.server import ServerProcess, http_json
from tests.support.sipp import invite, raw_sip, sdp


@pytest.fixture(scope="module")
def sip_agent(tmp_path_factory, demo_dir):
    require("pjsua2")
    srv = ServerProcess(tmp_path_factory.mktemp("sipreg"), demo_dir.parent, {
        "engine": {"max_calls": 2}, "personas": {"unknown_numbers": "refuse"},
        "sip": {"enabled": True, "rtp_port": 29000}})
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.mark.parametrize("number, body, ctype", [
    ("5559999", "", "application/sdp"),  # late offer (no SDP in the INVITE), refused: used to abort pjsua
    ("5559999", "", "application/s"),  # truncated content type, refused
    ("1001", "", "application/sdp"),  # late offer, taken
])
def test_an_invite_without_an_offer_is_answered_and_the_server_stays_up(sip_agent, number, body, ctype):
    first = raw_sip(sip_agent.sip_port, invite([f"Content-Type: {ctype}"], body, number=number), timeout=2)
    assert first is not None and first.startswith("SIP/2.0 ")
    # the server is still there, and still takes a proper call's INVITE
    assert poll(lambda: sip_agent.proc.poll(), lambda rc: rc is None, 1.5) is None
    assert http_json(sip_agent.url + "/healthz")[0] == 200
    assert raw_sip(sip_agent.sip_port, invite(["Content-Type: application/sdp"], sdp(), number="5559999")) \
        == "SIP/2.0 100 Trying"


def test_a_taken_sip_port_stops_the_start_with_its_reason_and_exit_1(tmp_path):
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
                               "sip": {"enabled": True, "host": "127.0.0.1", "port": port}}))
    try:
        out = subprocess.run([sys.executable, "-m", "agent", "serve", "--config", str(cfg)], cwd=ROOT,
                             capture_output=True, text=True, timeout=180)
    finally:
        taken.close()
    assert out.returncode == 1, out.stderr[-3000:]
    lines = [json.loads(ln) for ln in out.stdout.splitlines() + out.stderr.splitlines() if ln.startswith("{")]
    (failed,) = [ln for ln in lines if ln.get("event") == "start_failed"]
    assert f"SIP endpoint failed to start on 127.0.0.1:{port}" in failed["error"]
    assert "Address already in use" in failed["error"]
