"""Outbound calls (issue 23 part 2): the ops API dials real sipp callees over SIP.

One server for the module (3 slots, outbound.max_concurrent 2, reserve_inbound 1, an ops token).
Callees are sipp in server mode: one answers and talks (its 200 OK names an RTP tap for the
agent's audio), one answers 486 or 603, one rings until the agent's CANCEL. The answer-to-first-
agent-RTP time is measured on the answered calls and printed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import statistics
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import components_fixture, poll, ROOT, rtp_ports, spoken_ulaw_wav, voicemail_greeting_ulaw
from tests.support.server import ServerProcess
from tests.support.sip_trace import Sipp, log_time
from tests.support.sipp_uas import SippCallee, TalkingTap
from tests.support.webhook_receiver import Receiver

SCENARIOS = Path(__file__).parent / "sipp"
TOKEN = "outbound-test-ops-token-0123456789abcdef"
WEBHOOK_SECRET = "o" * 40
#: answered calls the answer-to-first-RTP time is measured on
MEASURED_CALLS = 5

OUTBOUND_PERSONA = """\
kind: service
direction: outbound
company: CitySan Services
business: waste management
agent_name: Ayelen Lucero
variables:
  callee_name: ""
information:
  - "You are calling {callee_name} to confirm their pickup next week."
voice: NATF2
"""
INBOUND_PERSONA = OUTBOUND_PERSONA.replace("direction: outbound", "direction: inbound").replace(
    "kind: service", "kind: service\nnumbers: ['3050']")


components = components_fixture("pjsua2", "sipp", "espeak-ng", "sox")


@pytest.fixture(scope="module")
def ulaw(tmp_path_factory) -> Path:
    """The callee's "Hello? Who is this?" as a μ-law wav (sipp's rtp_stream plays it)."""
    d = tmp_path_factory.mktemp("outaudio")
    return spoken_ulaw_wav(d, "Hello? Who is this?")


@pytest.fixture(scope="module")
def ulaw_raw(ulaw) -> bytes:
    """The same as raw μ-law bytes (the talking tap's RTP payloads)."""
    raw = ulaw.with_suffix(".ulaw")
    subprocess.run(["sox", str(ulaw), "-t", "raw", "-e", "u-law", "-r", "8000", "-c", "1", str(raw)], check=True)
    return raw.read_bytes()


@pytest.fixture(scope="module")
def greeting_raw(tmp_path_factory) -> bytes:
    """A voicemail greeting (about 6 s) as raw μ-law bytes."""
    d = tmp_path_factory.mktemp("greeting")
    return voicemail_greeting_ulaw(d, "Mark Peters")


@pytest.fixture(scope="module")
def receiver():
    r = Receiver(WEBHOOK_SECRET.encode()).start()
    yield r
    r.close()


def webhook(receiver: Receiver, call_id: str, event: str, timeout: float = 15.0) -> dict | None:
    got = poll(lambda: [r for r in receiver.delivered(event) if r.key == f"{call_id}:{event}"], bool, timeout)
    assert len(got) <= 1 and all(r.valid for r in got), got
    return got[0].json if got else None


@pytest.fixture(scope="module")
def srv(tmp_path_factory, demo_dir, receiver):
    tmp = tmp_path_factory.mktemp("outbound")
    personas = tmp / "personas"
    shutil.copytree(ROOT / "personas", personas)
    (personas / "outbound-test.yaml").write_text(OUTBOUND_PERSONA)
    (personas / "inbound-only.yaml").write_text(INBOUND_PERSONA)
    server = ServerProcess(tmp, demo_dir.parent, {
        "engine": {"max_calls": 3},
        "sip": {"enabled": True, "rtp_port": rtp_ports()}, "media_timeout_s": 30,
        "ops": {"token_env": "PERSONAPLEX_OPS_TOKEN"},
        "outbound": {"enabled": True, "allowed_to": ["sip:*@127.0.0.1:*"],
                     "allowed_from": ["+4930123", "sip:sales@*"], "max_concurrent": 2, "reserve_inbound": 1,
                     "default_ring_timeout_s": 20},
        "recording": {"enabled": True, "dir": str(tmp / "rec")},
        "webhooks": {"call_end": {"url": receiver.url}, "call_start": {"url": receiver.url}, "timeout_s": 1.0,
                     "retry_base_s": 0.2, "retry_max_s": 0.5, "drain_timeout_s": 2.0},
        "state_dir": str(tmp / "state"),
    }, env={"PERSONAPLEX_OPS_TOKEN": TOKEN, "PERSONAPLEX_WEBHOOK_SECRET": WEBHOOK_SECRET})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def api(srv, method: str, path: str, body: dict | None = None, token: str = TOKEN) -> tuple[int, dict]:
    req = urllib.request.Request(srv.ops_url + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def state_of(srv, call_id: str) -> dict:
    return api(srv, "GET", f"/api/calls/{call_id}")[1]


def wait_state(srv, call_id: str, states: set[str], timeout: float = 15.0) -> dict:
    got = poll(lambda: state_of(srv, call_id), lambda v: v.get("state") in states, timeout)
    assert got.get("state") in states, got
    return got


def dial(srv, to: str, **kw) -> str:
    body = {"to": to, "persona": "outbound-test", **kw}
    status, got = api(srv, "POST", "/api/calls", body)
    assert status == 202 and got["state"] == "dialing", (status, got)
    return got["call_id"]


def no_calls_left(srv) -> None:
    """Every slot free again (the next test starts from an idle server)."""
    status, body = poll(lambda: api(srv, "GET", "/readyz"), lambda r: r[1].get("capacity_left") == 3, 15)
    assert body.get("capacity_left") == 3, body


def test_answered_call_starts_the_model_at_the_200_and_talks(srv, ulaw_raw, receiver):
    """The callee answers after ringing: the call is `answered`, its model starts only after
    the 200 OK, the agent's RTP reaches the port the callee's SDP named, the callee's
    variables are in the prompt, and DELETE hangs up (BYE). Measured: 200 OK -> first agent
    RTP packet with sound, over several calls."""
    latencies, first_packets = [], []
    for i in range(MEASURED_CALLS):
        tap = TalkingTap(ulaw_raw)
        callee = SippCallee(SCENARIOS / "uas_answer.xml", srv.config.parent,
                            {"@RING_MS@": "300", "@MEDIA_PORT@": str(tap.port)})
        try:
            call_id = dial(srv, callee.uri, variables={"callee_name": "Omar Torres"}, **({"from": "+493012345"}
                                                                                            if i == 0 else {}))
            seen = wait_state(srv, call_id, {"answered"})
            assert seen["direction"] == "outbound" and seen["to"] == callee.uri and seen["answered_at"], seen
            heard = poll(tap.first_sound, lambda t: t is not None, 15)
            assert heard is not None, f"no agent sound reached the callee's RTP port ({len(tap.packets)} packets)"
            if i == 0:  # "Hello? Who is this?" and a pause: a person
                amd = poll(lambda: state_of(srv, call_id), lambda v: v.get("amd") is not None, 10)
                assert (amd["state"], amd["amd"]) == ("answered", "human"), amd
            status, gone = api(srv, "DELETE", f"/api/calls/{call_id}")
            assert status == 200 and gone["state"] == "ended", gone
            rc, trace = callee.wait()
            assert rc == 0, trace[-3000:]
        finally:
            callee.kill()
            tap.close()
        msgs = callee.trace
        ok = next(m for m in msgs if m.sent and m.is_response(200))
        invite = next(m for m in msgs if not m.sent and m.method == "INVITE")
        assert any(not m.sent and m.method == "BYE" for m in msgs), "the agent did not hang up with BYE"
        if i == 0:
            assert "+493012345" in (invite.header("From") or ""), invite.head  # the caller ID asked for
        start = poll(lambda: [x for x in srv.lines() if x.get("event") == "call_start" and x.get("call_id") == call_id],
                     bool, 5)
        assert start and start[0]["direction"] == "outbound", start
        assert log_time(start[0]) >= ok.t - 0.002, "the model started before the callee answered"
        if i == 0:  # the webhooks: answered at the start, ended at the end, the callee's words heard
            begun, end = webhook(receiver, call_id, "call_start"), webhook(receiver, call_id, "call_end")
            assert (begun["direction"], begun["state"]) == ("outbound", "answered"), begun
            assert (end["direction"], end["state"], end["reason"]) == ("outbound", "ended", "supervisor"), end
            assert end["variables"]["callee_name"] == "Omar Torres" and end["caller_number"] == "+493012345", end
            assert end["amd"] == "human", end
        latencies.append(heard - ok.t)
        first_packets.append(tap.packets[0][0] - ok.t)
    print(f"\n[outbound] 200 OK -> first agent RTP with sound, {MEASURED_CALLS} calls: median "
          f"{statistics.median(latencies) * 1000:.0f} ms (min {min(latencies) * 1000:.0f}, max "
          f"{max(latencies) * 1000:.0f}); first RTP packet of any kind: median "
          f"{statistics.median(first_packets) * 1000:.0f} ms")
    ends = poll(lambda: [x for x in srv.lines() if x.get("event") == "call_end" and x.get("direction") == "outbound"],
                lambda e: len(e) >= MEASURED_CALLS, 10)
    assert len(ends) >= MEASURED_CALLS and {e["reason"] for e in ends} == {"supervisor"}, ends
    # the first call lasted until the verdict (2 s): the callee's "hello" reached the model
    assert ends[0]["caller_peak"] > 0.05, ends[0]
    records = poll(lambda: sorted((srv.config.parent / "rec").glob("*.json")), lambda r: len(r) >= 1, 10)
    record = json.loads(records[0].read_text())
    assert record["direction"] == "outbound" and "Omar Torres" in record["prompt"], record["prompt"]
    no_calls_left(srv)


def test_a_voicemail_greeting_is_detected_and_hung_up_on(srv, receiver, greeting_raw):
    """The callee answers with a long uninterrupted greeting: `amd: machine`, and the agent
    hangs up (outbound.on_machine: hangup) before the greeting is over."""
    greeting_s = len(greeting_raw) / 8000
    tap = TalkingTap(greeting_raw)
    callee = SippCallee(SCENARIOS / "uas_answer.xml", srv.config.parent, {"@RING_MS@": "200",
                                                                         "@MEDIA_PORT@": str(tap.port)})
    try:
        call_id = dial(srv, callee.uri)
        final = wait_state(srv, call_id, {"ended", "busy", "declined", "no_answer", "failed"}, 20)
        rc, trace = callee.wait()
        assert rc == 0, trace[-3000:]
    finally:
        callee.kill()
        tap.close()
    assert (final["state"], final["amd"], final["reason"]) == ("ended", "machine", "answering_machine"), final
    msgs = callee.trace
    ok = next(m for m in msgs if m.sent and m.is_response(200))
    bye = next(m for m in msgs if not m.sent and m.method == "BYE")
    assert 1.5 < bye.t - ok.t < greeting_s, (bye.t - ok.t, greeting_s)  # mid-greeting
    end = webhook(receiver, call_id, "call_end")
    assert (end["amd"], end["reason"], end["state"]) == ("machine", "answering_machine", "ended"), end
    metrics = urllib.request.urlopen(urllib.request.Request(srv.ops_url + "/metrics", headers={
        "Authorization": f"Bearer {TOKEN}"}), timeout=5).read().decode()
    assert 'personaplex_outbound_calls_total{amd="machine",state="ended"} 1.0' in metrics
    print(f"\n[amd] {greeting_s:.1f} s greeting: BYE {bye.t - ok.t:.2f} s after the 200 OK")
    no_calls_left(srv)


@pytest.mark.parametrize("code,reason,state", [(486, "Busy Here", "busy"), (603, "Decline", "declined")])
def test_refused_call_ends_busy_or_declined_and_frees_its_slot(srv, receiver, code, reason, state):
    callee = SippCallee(SCENARIOS / "uas_refuse.xml", srv.config.parent, {"@CODE@": str(code), "@REASON@": reason})
    try:
        call_id = dial(srv, callee.uri)
        final = wait_state(srv, call_id, {"busy", "declined", "no_answer", "failed", "ended"})
        rc, trace = callee.wait()
        assert rc == 0, trace[-3000:]
    finally:
        callee.kill()
    assert final["state"] == state and final["sip_status"] == code and final["answered_at"] is None, final
    assert final["ended_at"] >= final["started_at"], final
    starts = [x for x in srv.lines() if x.get("event") == "call_start" and x.get("call_id") == call_id]
    assert not starts, "the model started for a call nobody answered"
    end = webhook(receiver, call_id, "call_end")
    assert (end["direction"], end["state"], end["answered_at"]) == ("outbound", state, None), end
    assert webhook(receiver, call_id, "call_start", timeout=0) is None
    assert end["dialled_number"] == callee.uri  # the webhook has the number; the log never does
    assert str(callee.port) not in srv.log_path.read_text()
    no_calls_left(srv)


def test_unanswered_call_is_cancelled_at_the_ring_timeout(srv):
    callee = SippCallee(SCENARIOS / "uas_no_answer.xml", srv.config.parent)
    try:
        call_id = dial(srv, callee.uri, ring_timeout_s=2)
        wait_state(srv, call_id, {"ringing"}, 5)
        final = wait_state(srv, call_id, {"busy", "declined", "no_answer", "failed", "ended"}, 10)
        rc, trace = callee.wait()
        assert rc == 0, trace[-3000:]
    finally:
        callee.kill()
    assert final["state"] == "no_answer" and final["reason"] == "ring_timeout", final
    msgs = callee.trace
    invite = next(m for m in msgs if not m.sent and m.method == "INVITE")
    cancel = next(m for m in msgs if not m.sent and m.method == "CANCEL")
    assert 1.9 <= cancel.t - invite.t <= 4.0, cancel.t - invite.t
    no_calls_left(srv)


def test_delete_cancels_a_ringing_call(srv):
    callee = SippCallee(SCENARIOS / "uas_no_answer.xml", srv.config.parent)
    try:
        call_id = dial(srv, callee.uri)
        wait_state(srv, call_id, {"ringing"}, 5)
        status, got = api(srv, "DELETE", f"/api/calls/{call_id}")
        assert status == 200 and got["state"] == "ended" and got["reason"] == "cancelled", got
        rc, trace = callee.wait()
        assert rc == 0, trace[-3000:]
    finally:
        callee.kill()
    assert any(not m.sent and m.method == "CANCEL" for m in callee.trace)
    assert state_of(srv, call_id)["state"] == "ended"  # still readable after its end
    no_calls_left(srv)


def test_delete_before_any_provisional_frees_the_slot_and_a_crossing_200_gets_bye(srv):
    """A callee that has said nothing (no 1xx: RFC 3261 allows no CANCEL yet) is given up at
    once on DELETE, its slot free, not at Timer B 32 s later (pjsua ends such a call locally,
    487); when it answers 200 anyway, the agent ACKs and hangs up with BYE, sends no CANCEL,
    and no model ever starts for it."""
    callee = SippCallee(SCENARIOS / "uas_silent_then_answer.xml", srv.config.parent, {"@ANSWER_MS@": "3000"},
                        timeout=20)
    try:
        call_id = dial(srv, callee.uri)
        poll(lambda: [m for m in callee.trace if not m.sent and m.method == "INVITE"], bool, 5)
        status, got = api(srv, "DELETE", f"/api/calls/{call_id}")
        assert status == 200 and got["state"] == "ended" and got["reason"] == "cancelled", got
        free = api(srv, "GET", "/readyz")[1]
        assert free.get("capacity_left") == 3, free
        rc, trace = callee.wait()
        assert rc == 0, trace[-3000:]
    finally:
        callee.kill()
    got = [m.method or m.status for m in callee.trace if not m.sent]
    assert "ACK" in got and "BYE" in got and "CANCEL" not in got, got
    assert state_of(srv, call_id)["state"] == "ended"
    assert not [ln for ln in srv.lines() if ln.get("call_id") == call_id and ln.get("event") == "call_start"]
    no_calls_left(srv)


def test_api_refusals(srv, ulaw, tmp_path):
    """Bad bodies, allow-lists, personas and capacity are refused before anything is dialled."""
    target = "sip:nobody@127.0.0.1:9"
    cases = [({"persona": "outbound-test"}, 400), ({"to": target, "persona": "outbound-test", "colour": 1}, 400),
             ({"to": "not a number", "persona": "outbound-test"}, 400),
             ({"to": "sip:x@elsewhere.example", "persona": "outbound-test"}, 403),
             ({"to": "+4930999", "persona": "outbound-test"}, 400),  # a number, and no trunk to dial it through
             ({"to": target, "persona": "outbound-test", "from": "+4940123"}, 403),
             ({"to": target, "persona": "nobody"}, 404), ({"to": target, "persona": "inbound-only"}, 404)]
    for body, expected in cases:
        status, got = api(srv, "POST", "/api/calls", body)
        assert status == expected and got.get("error"), (body, status, got)
    assert api(srv, "POST", "/api/calls", {"to": target, "persona": "outbound-test"}, token="wrong")[0] == 401
    assert api(srv, "GET", "/api/calls/out-nonexistent")[0] == 404

    # capacity: 3 slots, 2 outbound at most, 1 slot kept for inbound callers
    a, b = (SippCallee(SCENARIOS / "uas_no_answer.xml", tmp_path) for _ in range(2))
    inbound, dialled = None, []
    try:
        first = dial(srv, a.uri)
        dialled.append(first)
        second = dial(srv, b.uri)
        dialled.append(second)
        status, got = api(srv, "POST", "/api/calls", {"to": target, "persona": "outbound-test"})
        assert status == 503 and got["reason"] == "capacity" and "max_concurrent" in got["error"], got
        assert api(srv, "DELETE", f"/api/calls/{second}")[1]["state"] == "ended"
        # "ended" means its slot is free: the next request sees it at once
        free = api(srv, "GET", "/readyz")[1]
        assert free.get("capacity_left") == 2, free
        # an inbound caller takes a slot: 1 free, and it is the inbound reserve
        inbound = Sipp(srv.sip_port, SCENARIOS / "uac_until_bye.xml", "1001", tmp_path, {"@RTP_FILE@": str(ulaw)},
                       timeout=60).start()
        live = poll(lambda: api(srv, "GET", "/readyz")[1], lambda r: r.get("capacity_left") == 1, 15)
        assert live.get("capacity_left") == 1, live
        status, got = api(srv, "POST", "/api/calls", {"to": target, "persona": "outbound-test"})
        assert status == 503 and got["reason"] == "capacity" and "reserve_inbound" in got["error"], got
        # the inbound call reads through the same API, and DELETE hangs it up
        calls = poll(lambda: api(srv, "GET", "/api/calls")[1], lambda c: c.get("calls"), 10)
        (mine,) = [c for c in calls["calls"] if c.get("endpoint") == "sip" and c["call_id"] not in (first, second)] \
            or [None]
        assert mine is not None, calls
        assert state_of(srv, mine["call_id"])["state"] in ("ringing", "answered")
        view = wait_state(srv, mine["call_id"], {"answered"})  # (a DELETE before the 200 would refuse it: 480)
        assert view["direction"] == "inbound" and view["to"] == "1001", view
        status, gone = api(srv, "DELETE", f"/api/calls/{mine['call_id']}")
        assert status == 200 and gone["state"] == "ended", gone
        rc, trace = inbound.wait()
        assert rc == 0, trace[-3000:]
        assert state_of(srv, mine["call_id"])["state"] == "ended"
        assert api(srv, "DELETE", f"/api/calls/{first}")[1]["state"] == "ended"
    finally:
        for call_id in dialled:  # a failed try leaves nothing dialling for the next one
            api(srv, "DELETE", f"/api/calls/{call_id}")
        for c in (a, b):
            c.kill()
        if inbound is not None:
            inbound.kill()
    no_calls_left(srv)


def test_outbound_only_persona_is_not_answered_inbound(srv, tmp_path):
    e = Sipp(srv.sip_port, SCENARIOS / "uac_expect.xml", "outbound-test", tmp_path,
             {"@CODE@": "404", "@HEADER@": "-", "@HEADER_RE@": "SIP/2.0 404"}, timeout=15)
    rc, msgs = e.start().wait()
    assert rc == 0, msgs[-3000:]


def test_a_number_is_dialled_through_the_trunk_with_the_caller_id_asked_for(tmp_path, demo_dir):
    """With `sip.registration`, a number goes to the registrar's host as sip:<number>@trunk, From
    the `from` number at the trunk; the trunk's digest challenge (407) is answered with the
    registration's credentials; the trunk's 486 is `busy`."""
    trunk = SippCallee(SCENARIOS / "uas_trunk.xml", tmp_path, timeout=60, calls=2)  # REGISTER, INVITE
    srv2 = ServerProcess(tmp_path, demo_dir.parent, {
        "sip": {"enabled": True, "rtp_port": rtp_ports(),
                "registration": {"registrar": f"sip:127.0.0.1:{trunk.port}", "user": "agent",
                                 "realm": "test.example"}},
        "ops": {"token_env": "PERSONAPLEX_OPS_TOKEN"},
        "outbound": {"enabled": True, "allowed_to": ["+4930"], "allowed_from": ["+4930123"]},
    }, env={"PERSONAPLEX_OPS_TOKEN": TOKEN, "PERSONAPLEX_SIP_PASSWORD": "trunk-pw"})
    try:
        srv2.wait_ready()
        status, got = api(srv2, "POST", "/api/calls", {"to": "+49 30 555-0100", "persona": "citysan",
                                                        "from": "+493012345"})
        assert status == 202, got
        final = wait_state(srv2, got["call_id"], {"busy", "declined", "no_answer", "failed", "ended"})
        assert (final["state"], final["to"], final["from"]) == ("busy", "+49305550100", "+493012345"), final
        rc, trace = trunk.wait(30)
        assert rc == 0, trace[-3000:]
    finally:
        trunk.kill()
        srv2.stop()
    invites = [m for m in trunk.trace if not m.sent and m.method == "INVITE"]
    assert len(invites) == 2 and invites[0].header("Proxy-Authorization") is None, invites
    for invite in invites:
        assert invite.first_line.startswith(f"INVITE sip:+49305550100@127.0.0.1:{trunk.port}"), invite.first_line
        # the caller ID at the trunk's host (pjsip writes From without the port)
        assert invite.header("From").startswith("sip:+493012345@127.0.0.1"), invite.head
    # the digest (RFC 2617, MD5, no qop) is the one the registration's user and password give
    auth = invites[1].header("Proxy-Authorization")
    assert auth and auth.startswith("Digest "), invites[1].text
    fields = dict(re.findall(r'(\w+)="?([^",]*)"?', auth[len("Digest "):]))
    assert (fields["username"], fields["realm"], fields["nonce"]) == ("agent", "test.example", "5e2a9c0b7d1f4e36")
    md5 = lambda text: hashlib.md5(text.encode()).hexdigest()  # noqa: E731
    assert fields["response"] == md5(f"{md5('agent:test.example:trunk-pw')}:{fields['nonce']}:"
                                     f"{md5('INVITE:' + fields['uri'])}"), auth
