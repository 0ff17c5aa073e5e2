"""SIP requests a caller or a stranger may not make of the agent (holes a code review found):
an in-dialog REFER that made the agent dial any URI, INVITE with Replaces taking over a call,
out-of-dialog SUBSCRIBE/REFER/NOTIFY/PUBLISH/MESSAGE that pjsua answered 200 or not at all,
OPTIONS that told strangers the agent's capacity. All on 127.0.0.1, real server, sipp."""

from __future__ import annotations

import ctypes
import socket
from pathlib import Path

import pytest

from tests.support import components_fixture, poll, rtp_ports
from tests.support.server import (settles_calls_of, ServerProcess, call_end_of, ended, http_json, metric,
                                  wait_capacity)
from tests.support.sip_trace import Sipp, parse_trace
from tests.support.sip_trace import sipp as run_sipp
from tests.support.sipp import Trap, raw_sip, request

SCENARIOS = Path(__file__).parent / "sipp"
REFUSED = 'personaplex_sip_refused_requests_total{{method="{}",reason="{}"}}'


components = components_fixture("pjsua2", "sipp")


@pytest.fixture(scope="module")
def agent(tmp_path_factory, demo_dir):
    """Default sip.allow_from (127.0.0.0/8), one call slot: "full" is one call away."""
    srv = ServerProcess(tmp_path_factory.mktemp("sipsec"), demo_dir.parent, {
        "engine": {"max_calls": 1},
        "sip": {"enabled": True, "rtp_port": rtp_ports()},
        "media_timeout_s": 4})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


calls_settle = settles_calls_of("agent")


def answer_to(trace, method: str, cseq: int) -> list[int]:
    """Final status codes (>= 200) sipp received for its request `cseq method`."""
    return [m.status for m in trace if not m.sent and m.status is not None and m.status >= 200
            and m.cseq == (cseq, method)]


@pytest.mark.slow
def test_in_dialog_refer_is_declined_and_dials_nothing(tmp_path, demo_dir):
    """The caller REFERs the agent to a "premium number" on a loopback port the test listens
    on: the REFER gets a final refusal (not 202), nothing ever reaches that port, the call goes
    on until the caller's BYE, and the server still stops cleanly (exit 0; it used to crash in
    hangupAllCalls after pjsua had placed the transfer call)."""
    trap = Trap()
    srv = ServerProcess(tmp_path, demo_dir.parent, {"sip": {"enabled": True, "rtp_port": rtp_ports()}})
    try:
        srv.wait_ready()
        before = ended(srv)
        rc, msgs = run_sipp(srv.sip_port, SCENARIOS / "uac_refer_in.xml", "1001", tmp_path,
                            {"@PREMIUM_PORT@": str(trap.port)})
        trace = parse_trace(msgs)
        assert [m for m in trace if m.sent and m.method == "REFER"], msgs[-3000:]
        answers = answer_to(trace, "REFER", 2)
        assert answers and all(400 <= a < 700 for a in answers), f"REFER answered {answers}: {msgs[-3000:]}"
        assert rc == 0, msgs[-3000:]
        # nothing at all arrives at the Refer-To (the transfer call would be on its way in ms)
        assert poll(trap.received, bool, 3.0, step=0.1) == []
        assert answer_to(trace, "BYE", 3) == [200]  # the call was still up
        assert call_end_of(srv, before, "1001")["reason"] == "caller_hangup"
        assert metric(srv, REFUSED.format("REFER", "refer")) == 1
        refused = [ln for ln in srv.lines() if ln.get("event") == "sip_refer_refused"]
        assert len(refused) == 1 and refused[0]["level"] == "warning" and refused[0]["status"] == 603
        assert "19005550123" not in srv.log_path.read_text()  # the Refer-To (a number) is not logged
    finally:
        trap.close()
        assert srv.stop() == 0


def test_invite_with_replaces_cannot_take_over_a_call(agent, tmp_path):
    """While its call is up, the caller sends an INVITE with Replaces naming that call: refused
    (403), nothing answered for it; the first call is still up and ends by the caller's BYE."""
    before = ended(agent)
    replaces_before = metric(agent, REFUSED.format("INVITE", "replaces"))
    rc, msgs = run_sipp(agent.sip_port, SCENARIOS / "uac_replaces.xml", "1001", tmp_path)
    trace = parse_trace(msgs)
    invites = [m for m in trace if m.sent and m.method == "INVITE"]
    assert len(invites) == 2 and invites[1].header("Replaces"), msgs[-3000:]
    finals = [m.status for m in trace if not m.sent and m.status is not None and m.status >= 200
              and m.cseq == (1, "INVITE") and "intruder" in (m.header("From") or "")]
    assert finals and all(400 <= f < 700 for f in finals), f"Replaces INVITE answered {finals}: {msgs[-3000:]}"
    assert rc == 0, msgs[-3000:]
    assert not [m for m in trace if not m.sent and m.method == "BYE"], "the agent hung up the first call"
    assert answer_to(trace, "BYE", 2) == [200]
    assert call_end_of(agent, before, "1001")["reason"] == "caller_hangup"
    assert metric(agent, REFUSED.format("INVITE", "replaces")) == replaces_before + 1
    # refused by the request filter, before pjsua matched it to the call (its Replaces check
    # found the header: it read the parsed message, no "unreadable" fallback)
    assert not [ln for ln in agent.lines() if ln.get("event") in ("sip_rx_source_unreadable", "sip_replaces_refused")]


@pytest.mark.parametrize("method, headers, body, expected", [
    ("SUBSCRIBE", ["Event: presence", "Expires: 60"], "", "SIP/2.0 489 Bad Event"),  # was 200
    ("SUBSCRIBE", ["Event: dialog", "Expires: 60"], "", "SIP/2.0 489 Bad Event"),
    ("SUBSCRIBE", ["Expires: 60"], "", "SIP/2.0 489 Bad Event"),  # was 400
    ("REFER", ["Refer-To: <sip:+19005550123@127.0.0.1:9>"], "", "SIP/2.0 403 Forbidden"),  # was no answer
    ("NOTIFY", ["Event: message-summary", "Subscription-State: active",
                "Content-Type: application/simple-message-summary"], "Messages-Waiting: yes\r\n",
     "SIP/2.0 403 Forbidden"),  # was 200
    ("NOTIFY", ["Event: refer", "Subscription-State: terminated", "Content-Type: message/sipfrag"],
     "SIP/2.0 200 OK\r\n", "SIP/2.0 403 Forbidden"),  # was no answer
    ("PUBLISH", ["Event: presence", "Expires: 60", "Content-Type: application/pidf+xml"], "<presence/>",
     "SIP/2.0 403 Forbidden"),  # was no answer
    ("MESSAGE", ["Content-Type: text/plain"], "hello", "SIP/2.0 403 Forbidden"),  # was 200
])
def test_out_of_dialog_requests_are_refused(agent, method, headers, body, expected):
    reason = "subscribe" if method == "SUBSCRIBE" else "out_of_dialog"
    before = metric(agent, REFUSED.format(method, reason))
    assert raw_sip(agent.sip_port, request(method, headers, body)) == expected
    assert metric(agent, REFUSED.format(method, reason)) == before + 1


def test_options_from_inside_the_acl_tell_capacity(agent, tmp_path):
    """From 127.0.0.1 (inside the default allow_from): 200 with a slot free, 503 Full while the
    one slot is taken (a silent caller, hung up by the RTP timeout), 200 again after."""
    assert raw_sip(agent.sip_port, request("OPTIONS")) == "SIP/2.0 200 OK"
    holder = Sipp(agent.sip_port, SCENARIOS / "uac_silent.xml", "1001", tmp_path).start()
    try:
        # /readyz says 503 while full: wait on its count, whatever its status
        assert poll(lambda: http_json(agent.url + "/readyz")[1]["capacity_left"], lambda n: n == 0, 15) == 0
        assert raw_sip(agent.sip_port, request("OPTIONS")) == "SIP/2.0 503 Full"
    finally:
        rc, msgs = holder.wait()
    assert rc == 0, msgs[-3000:]
    assert wait_capacity(agent, 1)["capacity_left"] == 1
    assert raw_sip(agent.sip_port, request("OPTIONS")) == "SIP/2.0 200 OK"


def test_requests_from_outside_the_acl_get_403(tmp_path, demo_dir):
    """sip.allow_from 10.0.0.0/8: 127.0.0.1 is a stranger. OPTIONS (no capacity oracle),
    SUBSCRIBE, MESSAGE and INVITE all get 403."""
    srv = ServerProcess(tmp_path, demo_dir.parent, {"sip": {"enabled": True, "allow_from": ["10.0.0.0/8"],
                                                            "rtp_port": rtp_ports()}})
    try:
        srv.wait_ready()
        assert raw_sip(srv.sip_port, request("OPTIONS")) == "SIP/2.0 403 Forbidden"
        assert raw_sip(srv.sip_port, request("SUBSCRIBE", ["Event: presence", "Expires: 60"])) \
            == "SIP/2.0 403 Forbidden"
        assert raw_sip(srv.sip_port, request("MESSAGE", ["Content-Type: text/plain"], "hi")) \
            == "SIP/2.0 403 Forbidden"
        rc, msgs = run_sipp(srv.sip_port, SCENARIOS / "uac_expect.xml", "1001", tmp_path,
                            {"@CODE@": "403", "@HEADER@": "-", "@HEADER_RE@": "SIP/2.0 403"})
        assert rc == 0, msgs[-3000:]
        for m in ("OPTIONS", "SUBSCRIBE", "MESSAGE"):
            assert metric(srv, REFUSED.format(m, "forbidden_source")) == 1, m
        assert metric(srv, 'personaplex_calls_total{endpoint="sip",outcome="refused_forbidden"}') == 1
        # the source was read from the packet (no "unreadable" fallback behind these 403s)
        assert not [ln for ln in srv.lines() if ln.get("event") == "sip_rx_source_unreadable"]
    finally:
        assert srv.stop() == 0


# -- the source address as read from pjsip_rx_data (no server) ------------------------------------
def _fake_rdata(method: bytes = b"OPTIONS", src: str = "127.0.0.1", port: int = 5070):
    """A pjsip_rx_data as our mirror of it sees one, filled the way pjsip's UDP transport does."""
    from telephony.sip import options

    rx = options.RxData()
    packet = method + b" sip:1001@127.0.0.1 SIP/2.0\r\n\r\n"
    ctypes.memmove(ctypes.addressof(rx) + options._PACKET_OFFSET, packet, len(packet))
    pkt = rx.pkt_info
    pkt.len = len(packet)
    pkt.src_addr.family = socket.AF_INET
    pkt.src_addr.port_be[:] = list(port.to_bytes(2, "big"))
    pkt.src_addr.flowinfo[:] = list(socket.inet_aton(src))
    pkt.src_addr_len = 16
    pkt.src_name = src.encode()
    pkt.src_port = port
    info = ctypes.create_string_buffer(b"Request msg " + method + b"/cseq=1 (rdata0x1)")
    rx.msg_info.msg_buf = ctypes.addressof(rx) + options._PACKET_OFFSET
    rx.msg_info.info = ctypes.addressof(info)
    return rx, info


def test_source_is_read_only_when_the_struct_is_consistent():
    from telephony.sip.options import read_source

    rx, info = _fake_rdata()
    assert read_source(ctypes.addressof(rx), ctypes.addressof(info), "OPTIONS") == ("127.0.0.1", "ok")
    breakages = [
        lambda r: setattr(r.msg_info, "info", 0),  # not the rdata get_info described
        lambda r: setattr(r.pkt_info, "src_port", 5071),  # text and binary sources differ
        lambda r: setattr(r.pkt_info, "src_name", b"10.0.0.1"),
        lambda r: setattr(r.pkt_info, "src_name", b"localhost"),
        lambda r: setattr(r.pkt_info.src_addr, "family", 99),
        lambda r: setattr(r.pkt_info, "len", 0),
        lambda r: setattr(r.msg_info, "msg_buf", ctypes.addressof(r)),  # outside the packet
    ]
    for i, brk in enumerate(breakages):
        rx, info = _fake_rdata()
        brk(rx)
        source, why = read_source(ctypes.addressof(rx), ctypes.addressof(info), "OPTIONS")
        assert source is None and why != "ok", i
    rx, info = _fake_rdata(b"MESSAGE")  # the packet names another method than the info
    assert read_source(ctypes.addressof(rx), ctypes.addressof(info), "OPTIONS")[0] is None


def test_an_unreadable_source_fails_closed():
    from telephony.sip.options import verdict

    assert verdict("OPTIONS", None, ["127.0.0.0/8"], None) == (403, "Forbidden", "forbidden_source")
    assert verdict("SUBSCRIBE", None, ["0.0.0.0/0"], None) == (403, "Forbidden", "forbidden_source")
    assert verdict("OPTIONS", None, ["0.0.0.0/0", "::/0"], None) is None  # open to all: pjsua's 200
    assert verdict("OPTIONS", "127.0.0.1", ["127.0.0.0/8"], "Full") == (503, "Full", None)
    assert verdict("OPTIONS", "127.0.0.1", ["10.0.0.0/8"], "Full") == (403, "Forbidden", "forbidden_source")
    assert verdict("INVITE", None, ["10.0.0.0/8"], None) is None  # SipTransport.incoming's ACL decides
    assert verdict("INVITE", "127.0.0.1", ["127.0.0.0/8"], None, replaces=True) == (403, "Forbidden", "replaces")
    assert verdict("BYE", None, ["10.0.0.0/8"], None) is None


def test_replaces_header_is_found_in_any_case_but_not_in_a_folded_line():
    """SipTransport.incoming's own Replaces check (pjsua normally never hands it such an INVITE)."""
    from telephony.sip.sipmsg import has_header

    head = "INVITE sip:1001@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070\r\n"
    assert has_header(head + "rePLACES : abc;to-tag=a;from-tag=b\r\n\r\n", "Replaces")
    assert not has_header(head + "Subject: x\r\n Replaces: folded\r\n\r\nReplaces: in the body", "Replaces")
