"""The campaign CLI (issue 23) against a real server placing real SIP calls: `personaplex-agent
campaign run` as a subprocess drives the server's ops API (POST/GET /api/calls, with its bearer
token); sipp callees answer, talk and hang up, or refuse (486 once, 603). One server for the
module: 2 call slots, outbound calls may take both.

- 6 rows over 2 slots: one busy number retried, a do-not-call row never dialled, a duplicate
  row never dialled while its twin is in progress, a declined row not retried; the results file
  row by row, and the callees' own traces for what reached them and when.
- SIGTERM mid-campaign, run again: the calls in flight are looked up, not redialled; every
  callee got exactly one INVITE.
- outside the calling window: nothing is dialled, the CLI waits, and stops cleanly.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.support import components_fixture, poll, ROOT, rtp_ports, spoken_ulaw_wav, voicemail_greeting_ulaw
from tests.support.server import ServerProcess, settles_calls_of
from tests.support.sip_trace import SipMessage
from tests.support.sipp_uas import SippCallee, TalkingTap
from tests.support.sipp import Trap

SCENARIOS = Path(__file__).parent / "sipp"
TOKEN = "campaign-test-ops-token-0123456789abcdef"
RETRY_AFTER_S = 2.0
RATE = 2.0  # dials per second: INVITEs at least 0.5 s apart

calls_settle = settles_calls_of("srv")


components = components_fixture("pjsua2", "sipp", "espeak-ng", "sox")


@pytest.fixture(scope="module")
def ulaw(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("campaignaudio")
    return spoken_ulaw_wav(d, "Hello?")  # a person: short (a long greeting is a machine)


@pytest.fixture(scope="module")
def greeting(tmp_path_factory) -> bytes:
    """A voicemail greeting (about 6 s) as raw μ-law bytes, for a TalkingTap."""
    d = tmp_path_factory.mktemp("campaigngreeting")
    return voicemail_greeting_ulaw(d, "Omar Torres")


@pytest.fixture(scope="module")
def srv(tmp_path_factory, demo_dir):
    tmp = tmp_path_factory.mktemp("campaignsrv")
    server = ServerProcess(tmp, demo_dir.parent, {
        "engine": {"max_calls": 2},
        "sip": {"enabled": True, "rtp_port": rtp_ports()}, "media_timeout_s": 30,
        "ops": {"token_env": "PERSONAPLEX_OPS_TOKEN"},
        "outbound": {"enabled": True, "allowed_to": ["sip:*@127.0.0.1:*"], "max_concurrent": 2,
                     "reserve_inbound": 0, "default_ring_timeout_s": 20},
    }, env={"PERSONAPLEX_OPS_TOKEN": TOKEN})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def callee(tmp: Path, ulaw: Path, user: str, calls: int = 1, refuse: int = 0, code: int = 486,
           reason: str = "Busy Here", talk_ms: int = 1500, ring_ms: int = 300) -> SippCallee:
    """A sipp UAS (tests/e2e/sipp/uas_campaign.xml) taking `calls` calls on its own UDP port,
    listening before the campaign starts: the first `refuse` get `code`, the others are
    answered, hear speech for `talk_ms` and are hung up by the callee."""
    return SippCallee(SCENARIOS / "uas_campaign.xml", tmp, {
        "@RTP_FILE@": str(ulaw), "@TALK_MS@": str(talk_ms), "@RING_MS@": str(ring_ms),
        "@REFUSE_CALLS@": str(refuse), "@CODE@": str(code), "@REASON@": reason}, timeout=90, user=user, calls=calls)


def finished(callees: list[SippCallee]) -> list[int]:
    """Each callee's exit status once it took its calls (0: every call went as scripted)."""
    return [c.wait(30)[0] for c in callees]


def invites(c: SippCallee) -> list[SipMessage]:
    return [m for m in c.trace if not m.sent and m.method == "INVITE"]


def intervals(c: SippCallee) -> list[tuple[float, float]]:
    """(INVITE received, last message of that call) for each call: the 200 to the callee's BYE,
    or the ACK of its refusal."""
    trace = c.trace
    return [(inv.t, max(m.t for m in trace if m.header("Call-ID") == inv.header("Call-ID"))) for inv in invites(c)]


def write_leads(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["customer_name", "number"])
        w.writerows(rows)
    return path


def campaign(srv: ServerProcess, leads: Path, *extra: str) -> subprocess.Popen:
    """`personaplex-agent campaign run` as a user types it, its log (JSON) in LEADS.log."""
    cmd = [sys.executable, "-m", "server", "--log-format", "json", "campaign", "run", str(leads),
           "--persona", "citysan", "--ops-url", srv.ops_url, "--concurrency", "2", "--rate", str(RATE),
           "--retries", "2", "--retry-after", f"{RETRY_AFTER_S:g}s", "--poll-interval", "200ms", *extra]
    env = {**os.environ, "PERSONAPLEX_OPS_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    log = open(leads.with_suffix(".log"), "a")
    return subprocess.Popen(cmd, cwd=leads.parent, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: float = 90) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def results(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The most calls in progress at one moment."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = peak = 0
    for _, d in edges:
        now += d
        peak = max(peak, now)
    return peak


def test_six_rows_over_two_slots_busy_retried_dnc_skipped_duplicate_serialised(srv, tmp_path, ulaw):
    twice = callee(tmp_path, ulaw, "4001", calls=2, talk_ms=2500)  # rows 1 and 5: one number, two rows
    busy_once = callee(tmp_path, ulaw, "4002", calls=2, refuse=1, code=486, reason="Busy Here")
    plain = callee(tmp_path, ulaw, "4003")
    declines = callee(tmp_path, ulaw, "4006", refuse=1, code=603, reason="Decline")
    dnc_phone = Trap()  # a callee on the do-not-call list: nothing may reach it
    callees = [twice, busy_once, plain, declines]
    try:
        leads = write_leads(tmp_path / "leads.csv", [
            ("Omar Torres", twice.uri), ("Dana Levi", busy_once.uri),
            ("Avi Cohen", plain.uri), ("Noa Peretz", f"sip:4004@127.0.0.1:{dnc_phone.port}"),
            ("Omar again", twice.uri), ("Eli Katz", declines.uri)])
        (tmp_path / "dnc.txt").write_text("# asked not to be called\n 4004 \n+1 (415) 555-0199\n")
        started = time.time()
        proc = campaign(srv, leads, "--dnc", str(tmp_path / "dnc.txt"))
        rc = finish(proc)
        took = time.time() - started
        assert rc == 0, (tmp_path / "leads.log").read_text()[-3000:]
        assert finished(callees) == [0, 0, 0, 0], [c.output[-1500:] for c in callees]
        assert dnc_phone.received() == []

        got = results(tmp_path / "leads.results.csv")
        assert [list(r) for r in got[:1]] == [["number", "outcome", "attempts", "duration_s", "call_id",
                                               "customer_name"]]
        assert [(r["customer_name"], r["outcome"], r["attempts"]) for r in got] == [
            ("Omar Torres", "completed", "1"), ("Dana Levi", "completed", "2"), ("Avi Cohen", "completed", "1"),
            ("Noa Peretz", "dnc", "0"), ("Omar again", "completed", "1"), ("Eli Katz", "declined", "1")]
        assert [r["number"] for r in got] == [twice.uri, busy_once.uri, plain.uri,
                                              f"sip:4004@127.0.0.1:{dnc_phone.port}", twice.uri,
                                              declines.uri]
        assert got[3]["call_id"] == "" and got[3]["duration_s"] == ""
        ids = [r["call_id"] for r in got if r["outcome"] != "dnc"]
        assert all(ids) and len(set(ids)) == 5
        for r in got:  # what the server says of each call matches the row
            if r["outcome"] == "completed":
                code, call = http_json_auth(srv, f"/api/calls/{r['call_id']}")
                assert code == 200 and call["state"] == "ended" and call["answered_at"], call
                assert call["to"] == r["number"] and call["persona"] == "citysan"
                assert float(r["duration_s"]) == pytest.approx(call["ended_at"] - call["answered_at"], abs=0.15)
                assert float(r["duration_s"]) > 1.0
        assert got[5]["duration_s"] == ""

        # what reached the callees: the busy one twice, RETRY_AFTER_S apart; the duplicate number
        # never twice at once; never more than 2 calls at once, and 2 at once at some point
        (b1, b1_end), (b2, _) = intervals(busy_once)
        assert b2 - b1_end >= RETRY_AFTER_S - 0.05, (b1_end, b2)
        (t1, t1_end), (t2, _) = intervals(twice)
        assert t2 >= t1_end, "the duplicate row was dialled while its twin was in progress"
        spans = [iv for c in callees for iv in intervals(c)]
        assert len(spans) == 6 and max_overlap(spans) == 2
        dials = sorted(a for a, _ in spans)
        gaps = [b - a for a, b in zip(dials, dials[1:])]
        assert min(gaps) >= 1 / RATE - 0.1, gaps  # --rate (POSTs paced; INVITEs jitter a little)
        print(f"\n[campaign] 6 rows (5 dialled, 6 calls, 1 retry after {RETRY_AFTER_S:g} s) over 2 slots: "
              f"{took:.1f} s, min gap between dials {min(gaps):.2f} s")
    finally:
        for c in callees:
            c.kill()
        dnc_phone.close()


def http_json_auth(srv: ServerProcess, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(srv.ops_url + path, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _states(db: Path) -> dict[int, tuple[str, str | None]]:
    """Rows' (status, call id) as the campaign's state file holds them (read-only)."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return {row: (status, call_id) for row, status, call_id in
                conn.execute("SELECT row, status, call_id FROM leads")}
    except sqlite3.OperationalError:  # not created yet
        return {}
    finally:
        conn.close()


def test_sigterm_mid_campaign_then_resume_dials_no_number_twice(srv, tmp_path, ulaw):
    callees = [callee(tmp_path, ulaw, f"50{i}", talk_ms=4000) for i in range(4)]
    try:
        leads = write_leads(tmp_path / "leads.csv", [(f"Lead {i}", c.uri) for i, c in enumerate(callees)])
        db = tmp_path / "leads.campaign.sqlite"
        first = campaign(srv, leads)
        in_flight = poll(lambda: _states(db), lambda s: sum(v[0] == "active" for v in s.values()) == 2, 30, 0.05)
        assert sum(v[0] == "active" for v in in_flight.values()) == 2, in_flight
        first.send_signal(signal.SIGTERM)
        assert finish(first, 20) == 128 + signal.SIGTERM
        after_stop = _states(db)
        active = {row: cid for row, (status, cid) in after_stop.items() if status == "active"}
        assert len(active) == 2 and all(active.values()), after_stop
        partial = results(tmp_path / "leads.results.csv")
        assert sorted(r["outcome"] for r in partial) == ["active", "active", "pending", "pending"], partial

        second = campaign(srv, leads)
        assert finish(second) == 0, leads.with_suffix(".log").read_text()[-3000:]
        assert finished(callees) == [0, 0, 0, 0], [c.output[-1500:] for c in callees]
        assert [len(invites(c)) for c in callees] == [1, 1, 1, 1]
        got = results(tmp_path / "leads.results.csv")
        assert [(r["outcome"], r["attempts"]) for r in got] == [("completed", "1")] * 4, got
        for row, cid in active.items():  # the calls in flight were looked up again, by their ids
            assert got[row - 1]["call_id"] == cid
    finally:
        for c in callees:
            c.kill()


def test_outside_the_window_nothing_is_dialled_until_it_opens(srv, tmp_path, ulaw):
    never = Trap()
    try:
        leads = write_leads(tmp_path / "leads.csv", [("Omar Torres", f"sip:6001@127.0.0.1:{never.port}")])
        soon = datetime.now() + timedelta(hours=2)
        window = f"{soon:%H}:00-{(soon + timedelta(hours=1)):%H}:00"
        proc = campaign(srv, leads, "--window", window)
        log = leads.with_suffix(".log")
        waiting = poll(lambda: log.read_text() if log.exists() else "", lambda t: "campaign_waiting_window" in t, 20)
        assert "campaign_waiting_window" in waiting, waiting[-2000:]
        assert proc.poll() is None and never.received() == []
        assert _states(tmp_path / "leads.campaign.sqlite") == {1: ("pending", None)}
        proc.send_signal(signal.SIGINT)
        assert finish(proc, 20) == 128 + signal.SIGINT
        assert never.received() == []
        assert [r["outcome"] for r in results(tmp_path / "leads.results.csv")] == ["pending"]
    finally:
        never.close()


def test_capacity_refusals_wait_for_a_slot_and_are_not_attempts(srv, tmp_path, ulaw):
    """--concurrency 3 on a server with 2 slots: the third POST gets 503 capacity; the row
    waits for a slot and is dialled once, its attempts not counting the refusal."""
    callees = [callee(tmp_path, ulaw, f"70{i}", talk_ms=2000) for i in range(3)]
    try:
        leads = write_leads(tmp_path / "leads.csv", [(f"Lead {i}", c.uri) for i, c in enumerate(callees)])
        proc = campaign(srv, leads, "--concurrency", "3")
        assert finish(proc) == 0, leads.with_suffix(".log").read_text()[-3000:]
        assert finished(callees) == [0, 0, 0], [c.output[-1500:] for c in callees]
        got = results(tmp_path / "leads.results.csv")
        assert [(r["outcome"], r["attempts"]) for r in got] == [("completed", "1")] * 3, got
        (a, a_end), (b, b_end), (c, _) = (intervals(cl)[0] for cl in callees)
        assert c >= min(a_end, b_end), "the third call was placed while both slots were taken"
        assert max_overlap([(a, a_end), (b, b_end), (c, float("inf"))]) == 2
    finally:
        for c in callees:
            c.kill()


def test_a_persona_the_server_cannot_call_as_stops_the_campaign_at_once(srv, tmp_path):
    never = Trap()
    try:
        leads = write_leads(tmp_path / "leads.csv", [("Omar Torres", f"sip:8001@127.0.0.1:{never.port}")])
        cmd = [sys.executable, "-m", "server", "--log-format", "json", "campaign", "run", str(leads),
               "--persona", "no-such-persona", "--ops-url", srv.ops_url]
        env = {**os.environ, "PERSONAPLEX_OPS_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "error: the server cannot place calls as persona 'no-such-persona'" in out.stderr
        assert _states(tmp_path / "leads.campaign.sqlite") == {1: ("pending", None)}  # the row kept, no attempt
        retyped = [a if a != "no-such-persona" else "citysan" for a in cmd] + ["--state", str(tmp_path / "b.sqlite")]
        wrong = subprocess.run(retyped, cwd=tmp_path, env={**env, "PERSONAPLEX_OPS_TOKEN": "wrong-token"},
                               capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 2 and "refused the token" in wrong.stderr, wrong.stderr[-2000:]
        assert never.received() == []
    finally:
        never.close()


def test_a_voicemail_is_outcome_machine_not_completed(srv, tmp_path, greeting):
    """A callee whose answer is a long greeting: the server's answering-machine detection hangs
    up, and the campaign records `machine` (retryable: with --retries 0, final at once)."""
    tap = TalkingTap(greeting)
    voicemail = SippCallee(SCENARIOS / "uas_answer.xml", tmp_path, {"@RING_MS@": "200", "@MEDIA_PORT@": str(tap.port)},
                           user="9001")
    try:
        leads = write_leads(tmp_path / "leads.csv", [("Omar Torres", voicemail.uri)])
        assert finish(campaign(srv, leads, "--retries", "0")) == 0, leads.with_suffix(".log").read_text()[-3000:]
        assert voicemail.wait(30)[0] == 0, voicemail.output[-1500:]
    finally:
        voicemail.kill()
        tap.close()
    (row,) = results(tmp_path / "leads.results.csv")
    assert (row["outcome"], row["attempts"]) == ("machine", "1"), row
    assert 1.5 < float(row["duration_s"]) < len(greeting) / 8000  # hung up on mid-greeting
    code, call = http_json_auth(srv, f"/api/calls/{row['call_id']}")
    assert code == 200 and (call["state"], call["amd"]) == ("ended", "machine"), call
