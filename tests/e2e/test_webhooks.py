"""Transcripts, live events and call webhooks through the real server: a browser call (aiortc)
and a SIP call (sipp) each give a two-sided transcript that is on the ops event stream while
the call runs, and at the end in the call record and in exactly one signed webhook delivery;
the delivery survives a receiver that fails, hangs, is down, or refuses, and a `kill -9` of the
agent; a SIGTERM drains for a few seconds and leaves the rest on disk.

One server for the module (recording and webhooks on, SIP on), a real aiohttp receiver whose
answers each test sets; the restart tests run servers of their own on one state folder.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from server.webhooks.signing import verify
from tests.support import poll, require, rtp_ports
from tests.support.event_stream import EventStream, StalledReader
from tests.support.server import ServerProcess, http_json, metric, settles_calls_of
from tests.support.sip_trace import Sipp
from tests.support.webhook_receiver import Receiver
from tests.support.webrtc_client import WebRtcCaller

SECRET = "w" * 40
SCENARIOS = Path(__file__).parent / "sipp"
WEBHOOKS = {"timeout_s": 1.0, "retry_base_s": 0.2, "retry_max_s": 0.5, "drain_timeout_s": 2.0}


def server(tmp: Path, demo_dir: Path, receiver: Receiver, state: Path, **overrides) -> ServerProcess:
    cfg = {"engine": {"max_calls": 2},
           "recording": {"enabled": True, "dir": str(tmp / "rec"), "max_files": 50},
           "webhooks": {"call_end": {"url": receiver.url}, "call_start": {"url": receiver.url}, **WEBHOOKS},
           "state_dir": str(state)}
    cfg.update(overrides)
    srv = ServerProcess(tmp, demo_dir.parent, cfg, env={"PERSONAPLEX_WEBHOOK_SECRET": SECRET})
    srv.rec = tmp / "rec"
    srv.state = state
    return srv


@pytest.fixture(scope="module")
def receiver():
    r = Receiver(SECRET.encode()).start()
    yield r
    r.close()


@pytest.fixture(scope="module")
def wh_server(tmp_path_factory, demo_dir, receiver):
    require("sipp")
    require("pjsua2")
    tmp = tmp_path_factory.mktemp("webhooks")
    srv = server(tmp, demo_dir, receiver, tmp / "state",
                 sip={"enabled": True, "rtp_port": rtp_ports(), }, media_timeout_s=5,
                 ops={"event_stream": {"queue": 8, "buffer_bytes": 4096, "keepalive_s": 1.0}})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


calls_settle = settles_calls_of("wh_server")


@pytest.fixture(autouse=True)
def receiver_answers_ok(request):
    yield
    if "receiver" in request.fixturenames:
        request.getfixturevalue("receiver").reset()


# -- helpers ---------------------------------------------------------------------------------------------
def record_of(srv: ServerProcess, call_id: str, timeout: float = 10.0) -> dict:
    paths = poll(lambda: list(srv.rec.glob(f"*-{call_id}.json")), bool, timeout)
    assert paths, (call_id, sorted(p.name for p in srv.rec.glob("*")))
    meta = json.loads(paths[0].read_text())
    meta["_path"] = str(paths[0])
    return meta


def delivered_once(receiver: Receiver, call_id: str, event: str = "call_end", timeout: float = 15.0) -> dict:
    """The one 2xx delivery of the call's event: signed, keyed `<call_id>:<event>`."""
    key = f"{call_id}:{event}"
    got = poll(lambda: [r for r in receiver.delivered(event) if r.key == key], bool, timeout)
    assert len(got) == 1, (key, [(r.key, r.status) for r in receiver.of(key)])
    assert got[0].valid, got[0].signature  # HMAC over "<t>.<body>" with our secret, fresh
    assert verify(SECRET.encode(), got[0].signature, got[0].body)
    body = got[0].json
    assert body["event"] == event and body["call_id"] == call_id
    return body


def no_more_attempts_possible(srv: ServerProcess, call_id: str) -> None:
    """Nothing of this call is left in the queue that could be sent again."""
    rows = _rows(srv.state)
    assert not [r for r in rows if r["key"].startswith(call_id) and not r["dead"]], rows


def _rows(state: Path) -> list[dict]:
    db = sqlite3.connect(f"file:{state / 'webhooks.sqlite3'}?mode=ro", uri=True)
    try:
        cur = db.execute("SELECT key, event, attempts, dead, last_error FROM events ORDER BY id")
        return [dict(zip([d[0] for d in cur.description], r)) for r in cur.fetchall()]
    finally:
        db.close()


def browser_call(srv: ServerProcess, wav: str, persona: str = "citysan", frames: int = 60, dtmf: str = "",
                 watch: bool = False) -> dict:
    """A whole browser call: answered, the agent heard for `frames` x 20 ms, DTMF keys sent from
    the page, hung up by the page. With `watch`, the call's event stream is read meanwhile.
    Returns {"call_id", "caller", "stream", "listed"}."""
    out: dict = {}

    async def scenario():
        a = WebRtcCaller(srv.url, persona, wav)
        try:
            assert await a.call() == 200, a.body
            call_id = out["call_id"] = a.body["call_id"]
            await until(lambda: len(a.received) >= 5, 30)  # answered: the call is in the call list
            if watch:
                out["stream"] = EventStream(f"{srv.ops_url}/api/calls/{call_id}/events")
            await until(lambda: len(a.received) >= frames, 30)
            for digit in dtmf:
                a.channel.send(json.dumps({"type": "dtmf", "digit": digit}))
            await until(lambda: len([e for e in a.events if e.get("type") == "dtmf"]) >= len(dtmf), 10)
            out["listed"] = await asyncio.get_running_loop().run_in_executor(
                None, lambda: http_json(srv.ops_url + "/api/calls")[1]["calls"])
            await a.hangup()
            out["caller"] = a
        finally:
            await a.close()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    return out


async def until(cond, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        await asyncio.sleep(step)
    return cond()


def streamed(stream: EventStream, who: str) -> str:
    """One side's words as a live reader got them (no whitespace): the first event's transcript so
    far, then the pieces numbered after the ones it holds (README: the event stream)."""
    first = stream.events[0]
    pieces = stream.of("transcript")
    assert [p["n"] for p in pieces] == sorted({p["n"] for p in pieces}), "pieces out of order or repeated"
    return joined(first["transcript"], who) + joined([p for p in pieces if p["n"] > first["transcript_pieces"]], who)


def joined(pieces: list[dict], who: str) -> str:
    """A side's words without whitespace (pieces and segments join spaces differently)."""
    return "".join("".join(p["text"] for p in pieces if p["who"] == who).split())


# -- one call of each kind, end to end -------------------------------------------------------------------
def test_browser_call_transcript_live_in_record_and_in_one_signed_webhook(wh_server, receiver, caller_wav):
    srv = wh_server
    call = browser_call(srv, caller_wav, frames=150, dtmf="5", watch=True)
    call_id, stream = call["call_id"], call["stream"]
    try:
        # live: the call was listed with its latest lines, and its events streamed as it ran
        (listed,) = [c for c in call["listed"] if c["call_id"] == call_id]
        assert listed["persona"] == "citysan" and listed["endpoint"] == "webrtc" and listed["state"] == "live"
        assert listed["transcript"] and {s["who"] for s in listed["transcript"]} <= {"agent", "caller"}, listed
        assert stream.closed.wait(10), "the stream did not end with the call"
        assert stream.status == 200 and stream.content_type.startswith("text/event-stream")
        kinds = [e["type"] for e in stream.events]
        assert kinds[0] == "call" and kinds[-1] == "end" and stream.events[-1]["reason"] == "caller_hangup"
        assert stream.names == kinds  # every `event:` line names its object's type
        assert "live" == stream.events[0]["state"] and {"state": "ended"} in [
            {"state": e["state"]} for e in stream.of("state")]
        assert [e["digit"] for e in stream.of("dtmf")] == ["5"]
        levels = stream.of("levels")
        assert len(levels) >= 5 and max(e["agent"] for e in levels) > 0.01 and max(e["caller"] for e in levels) > 0.01
        duration = stream.events[-1]["t"]
        assert len(levels) <= 5 * duration + 2, (len(levels), duration)  # at most ~5 a second
        pieces = stream.of("transcript")
        assert len(pieces) >= 10 and all(p["t1"] > p["t0"] >= 0 for p in pieces)
    finally:
        stream.close()

    record = record_of(srv, call_id)
    body = delivered_once(receiver, call_id)
    # the webhook's transcript is the record's, and what streamed live is in it
    assert body["transcript"] == record["transcript"] and record["transcript"]
    assert {s["who"] for s in body["transcript"]} <= {"agent", "caller"}
    said = joined(body["transcript"], "agent")
    assert said and streamed(stream, "agent") == said
    assert streamed(stream, "caller") == joined(body["transcript"], "caller")
    heard = "".join("".join(e["text"] for e in call["caller"].events if e.get("type") == "text").split())
    assert heard and said.startswith(heard[: len(said)]) or heard.startswith(said), (heard[:100], said[:100])
    # the rest of the payload
    assert body["persona"] == "citysan" and body["endpoint"] == "webrtc" and body["reason"] == "caller_hangup"
    assert body["dialled_number"] == "citysan" and body["dtmf"] == "5"
    assert body["transfer"] is None  # citysan transfers on 0, not 5
    assert body["started_at"] <= body["answered_at"] <= body["ended_at"] and body["duration_s"] > 0.5
    assert body["variables"] == record["variables"] and body["reprimes"] == []
    assert body["recording"] == {"json": record["_path"], "wav": record["_path"][:-5] + ".wav"}
    assert [e for e in record["events"] if e["type"] == "dtmf"][0]["digit"] == "5"
    start = delivered_once(receiver, call_id, "call_start")
    assert start["persona"] == "citysan" and start["started_at"] == body["started_at"]
    assert set(start) == {"event", "call_id", "persona", "endpoint", "caller_number", "dialled_number",
                          "direction", "state", "started_at", "variables"}
    assert set(body) == {"event", "call_id", "persona", "endpoint", "caller_number", "dialled_number", "started_at",
                         "answered_at", "ended_at", "duration_s", "reason", "variables", "transcript", "dtmf",
                         "transfer", "reprimes", "recording", "direction", "queue_wait_s", "state", "amd"}
    assert body["direction"] == start["direction"] == "inbound" and body["queue_wait_s"] is None
    assert (start["state"], body["state"]) == ("ringing", "ended")
    no_more_attempts_possible(srv, call_id)
    # transcripts are personal data: never in the log
    words = [s["text"] for s in body["transcript"] if len(s["text"]) > 12]
    log = srv.log_path.read_text()
    assert words and not [w for w in words if w in log]


def test_sip_call_streams_live_and_gives_one_signed_webhook_with_its_records_transcript(wh_server, receiver, tmp_path, spoken_wav):
    srv = wh_server
    ulaw = tmp_path / "caller_ulaw.wav"
    subprocess.run(["sox", str(spoken_wav), "-r", "8000", "-c", "1", "-e", "u-law", str(ulaw)], check=True)
    caller = Sipp(srv.sip_port, SCENARIOS / "uac_call.xml", "1001", tmp_path, {"@RTP_FILE@": str(ulaw)}).start()
    stream = None
    try:
        sip_calls = poll(lambda: [c for c in http_json(srv.ops_url + "/api/calls")[1]["calls"]
                                  if c["endpoint"] == "sip" and c["state"] == "live"], bool, 15)
        assert len(sip_calls) == 1, sip_calls
        call_id = sip_calls[0]["call_id"]
        stream = EventStream(f"{srv.ops_url}/api/calls/{call_id}/events")
        rc, msgs = caller.wait()
        assert rc == 0, msgs[-3000:]
        assert stream.closed.wait(10) and stream.events[-1]["type"] == "end", stream.events[-3:]
    finally:
        caller.kill()
        if stream is not None:
            stream.close()
    body = delivered_once(receiver, call_id)
    record = record_of(srv, call_id)
    assert body["transcript"] == record["transcript"] and joined(body["transcript"], "agent")
    assert streamed(stream, "agent") == joined(body["transcript"], "agent")  # live, then in the webhook
    assert streamed(stream, "caller") == joined(body["transcript"], "caller")
    assert body["endpoint"] == "sip" and body["dialled_number"] == "1001" and body["caller_number"] == "caller"
    assert body["persona"] == "citysan" and body["reason"] == "caller_hangup" and body["dtmf"] == ""
    assert body["transfer"] is None
    delivered_once(receiver, call_id, "call_start")


# -- the receiver misbehaves -----------------------------------------------------------------------------
def test_500s_and_a_hang_past_the_timeout_are_retried_then_delivered_once(wh_server, receiver, caller_wav):
    srv = wh_server
    fives, timeouts = (metric(srv, f'personaplex_webhooks_failed_total{{reason="{r}"}}') for r in ("status_5xx",
                                                                                                   "timeout"))
    receiver.answer(500, 502, "hang", event="call_end")
    call_id = browser_call(srv, caller_wav, frames=25)["call_id"]
    body = delivered_once(receiver, call_id, timeout=20)
    assert [r.status for r in receiver.of(f"{call_id}:call_end")] == [500, 502, None, 200]
    assert body["transcript"] == record_of(srv, call_id)["transcript"]
    assert metric(srv, 'personaplex_webhooks_failed_total{reason="status_5xx"}') == fives + 2
    assert metric(srv, 'personaplex_webhooks_failed_total{reason="timeout"}') == timeouts + 1
    assert poll(lambda: metric(srv, "personaplex_webhooks_queue_depth"), lambda d: d == 0, 5) == 0


def test_a_400_is_dead_lettered_kept_and_counted(wh_server, receiver, caller_wav):
    srv = wh_server
    dead = metric(srv, 'personaplex_webhooks_dead_lettered_total{reason="rejected"}')
    receiver.answer(400, event="call_end")
    call_id = browser_call(srv, caller_wav, frames=25)["call_id"]
    assert poll(lambda: metric(srv, 'personaplex_webhooks_dead_lettered_total{reason="rejected"}'),
                lambda n: n == dead + 1, 15) == dead + 1
    (row,) = [r for r in _rows(srv.state) if r["key"] == f"{call_id}:call_end"]
    assert row["dead"] == 1 and row["last_error"] == "status_4xx" and row["attempts"] == 1
    assert [r.status for r in receiver.of(f"{call_id}:call_end")] == [400]  # and it is never tried again:
    no_more_attempts_possible(srv, call_id)
    assert metric(srv, "personaplex_webhooks_dead_letters") >= 1


def test_receiver_down_for_a_while_then_up_gets_the_event_late_once(wh_server, receiver, caller_wav):
    srv = wh_server
    refused = metric(srv, 'personaplex_webhooks_failed_total{reason="connect"}')
    receiver.stop()
    call_id = browser_call(srv, caller_wav, frames=25)["call_id"]
    # both events retried while nobody listens
    assert poll(lambda: metric(srv, 'personaplex_webhooks_failed_total{reason="connect"}'),
                lambda n: n >= refused + 4, 15) >= refused + 4
    assert metric(srv, "personaplex_webhooks_queue_depth") >= 1
    receiver.start()
    body = delivered_once(receiver, call_id)
    assert body["transcript"] == record_of(srv, call_id)["transcript"]
    assert [r.status for r in receiver.of(f"{call_id}:call_end")] == [200]  # the first that got through
    delivered_once(receiver, call_id, "call_start")


# -- the live stream -------------------------------------------------------------------------------------
def test_a_reader_that_stops_reading_is_dropped_and_the_call_goes_on(wh_server, caller_wav):
    srv = wh_server
    dropped = metric(srv, "personaplex_event_streams_dropped_total")
    out: dict = {}

    async def scenario():
        a = WebRtcCaller(srv.url, "teacher", caller_wav)
        try:
            assert await a.call() == 200, a.body
            assert await until(lambda: len(a.received) >= 5, 30)  # answered: the call is in the call list
            url = f"{srv.ops_url}/api/calls/{a.body['call_id']}/events"
            stalled, steady = StalledReader(url), EventStream(url)
            loop = asyncio.get_running_loop()
            try:
                assert await loop.run_in_executor(None, lambda: poll(
                    lambda: metric(srv, "personaplex_event_streams_dropped_total"), lambda n: n > dropped, 60)) \
                    == dropped + 1
                assert await loop.run_in_executor(None, stalled.cut)  # the server closed its connection
                # the call and the other reader went on
                heard, seen = len(a.received), len(steady.events)
                assert await until(lambda: len(a.received) > heard + 25 and len(steady.events) > seen + 5, 10)
                assert not steady.closed.is_set()
                await a.hangup()
                assert await until(steady.closed.is_set, 10)
                out["steady"] = steady.events
            finally:
                stalled.close()
                steady.close()
        finally:
            await a.close()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert out["steady"][-1]["type"] == "end"
    assert metric(srv, "personaplex_event_streams") == 0


def test_event_stream_of_an_unknown_call_is_404(wh_server):
    assert http_json(wh_server.ops_url + "/api/calls/no-such-call/events") == (
        404, {"error": "not_found", "reason": "no call in progress has this id"})


# -- restarts: kill -9, and a drain that leaves the rest on disk ------------------------------------------
@pytest.mark.slow
def test_kill_9_between_enqueue_and_delivery_then_delivered_after_restart(tmp_path, demo_dir, caller_wav):
    """The event is on disk when the call ends; the agent dies mid-attempt; the next start
    delivers it (the receiver sees the same key twice, one delivery). Then a SIGTERM with an
    attempt hanging: the agent waits webhooks.drain_timeout_s, exits, and leaves it on disk."""
    receiver = Receiver(SECRET.encode()).start()
    receiver.mode = "hang"
    receiver.hang_s = 60
    state = tmp_path / "state"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    only_call_end = {"call_end": {"url": receiver.url}, **WEBHOOKS, "timeout_s": 30.0}
    # and with transcript.keep off: who spoke when, no words, in the record and the webhook
    first = server(tmp_path / "a", demo_dir, receiver, state, webhooks=only_call_end, transcript={"keep": False})
    second = None
    try:
        first.wait_ready()
        call_id = browser_call(first, caller_wav, frames=25)["call_id"]
        key = f"{call_id}:call_end"
        assert poll(lambda: receiver.of(key), bool, 10)  # enqueued, and its attempt is hanging
        assert metric(first, "personaplex_webhooks_queue_depth") == 1
        record = record_of(first, call_id)
        first.proc.send_signal(signal.SIGKILL)
        first.stop(expect_exit=-9)
        receiver.mode = "ok"
        second = server(tmp_path / "b", demo_dir, receiver, state, webhooks=only_call_end)
        second.wait_ready()
        body = delivered_once(receiver, call_id)
        assert body["transcript"] == record["transcript"] and body["transcript"]
        assert all(set(seg) == {"who", "t0", "t1"} for seg in body["transcript"]), body["transcript"][:3]
        assert [r.key for r in receiver.of(key)] == [key, key]  # sent again with the same key, once delivered
        assert poll(lambda: metric(second, "personaplex_webhooks_queue_depth"), lambda d: d == 0, 5) == 0

        # SIGTERM: waits a few seconds for what is pending, then leaves it for the next start
        receiver.mode = "hang"
        call_id = browser_call(second, caller_wav, frames=25)["call_id"]
        assert poll(lambda: receiver.of(f"{call_id}:call_end"), bool, 10)
        t0 = time.monotonic()
        second.proc.send_signal(signal.SIGTERM)
        assert second.proc.wait(30) == 0
        assert time.monotonic() - t0 < 15  # the drain's 2 s, not the 30 s attempt
        (stopped,) = [ln for ln in second.lines() if ln.get("event") == "webhooks_stopped"]
        assert stopped["left_pending"] == 1
        assert [(r["key"], r["dead"]) for r in _rows(state)] == [(f"{call_id}:call_end", 0)]
    finally:
        first.stop(expect_exit=None)
        if second is not None:
            second.stop()
        receiver.close()
