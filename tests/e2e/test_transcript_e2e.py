"""Issue 22's end-to-end check: both sides' words, live and at the end, through the real server
with the caller transcriber on (`transcript.caller: kyutai`, the demo's built-in tiny STT).

A SIP call (sipp streaming a spoken sentence as RTP) and a browser call (aiortc) each: pieces of
the agent's and of the caller's words arrive on `GET /api/calls/{id}/events` while the call is
up; when it ends, its call record's transcript holds both sides, and exactly one signed
`call_end` webhook carries the record's transcript. The tiny STT's words are random, not the
sentence's; what is checked is that the caller's side takes every real path (Mimi codes of the
caller's audio, the batched STT, the transcript, the stream, the record, the webhook).

One server for the module; test_webhooks checks the rest of the payload with the STT off.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_webhooks import SECRET, WEBHOOKS, delivered_once, joined, record_of, streamed, until
from tests.support import poll, require, rtp_ports
from tests.support.event_stream import EventStream
from tests.support.server import ServerProcess, http_json, settles_calls_of
from tests.support.sip_trace import Sipp
from tests.support.webhook_receiver import Receiver
from tests.support.webrtc_client import WebRtcCaller

SCENARIOS = Path(__file__).parent / "sipp"
SIDES = {"agent", "caller"}


@pytest.fixture(scope="module")
def receiver():
    r = Receiver(SECRET.encode()).start()
    yield r
    r.close()


@pytest.fixture(scope="module")
def stt_server(tmp_path_factory, demo_dir, receiver):
    require("sipp")
    require("pjsua2")
    tmp = tmp_path_factory.mktemp("transcript")
    cfg = {"engine": {"max_calls": 2},
           "transcript": {"caller": "kyutai"},  # off on every other test server (CPU cost)
           "recording": {"enabled": True, "dir": str(tmp / "rec"), "max_files": 50},
           "webhooks": {"call_end": {"url": receiver.url}, **WEBHOOKS},
           "state_dir": str(tmp / "state"),
           "sip": {"enabled": True, "rtp_port": rtp_ports()}, "media_timeout_s": 5}
    srv = ServerProcess(tmp, demo_dir.parent, cfg, env={"PERSONAPLEX_WEBHOOK_SECRET": SECRET})
    srv.rec = tmp / "rec"
    try:
        srv.wait_ready()
        loaded = [ln for ln in srv.lines() if ln.get("event") == "model_loaded" and "codebooks" in ln]
        assert loaded and loaded[0]["source"].startswith("demo:"), "the caller STT did not load"
        yield srv
    finally:
        srv.stop()


calls_settle = settles_calls_of("stt_server")


def both_sides_streamed(stream: EventStream) -> bool:
    """Pieces of each side have arrived as live `transcript` events (not only the snapshot)."""
    return {p["who"] for p in stream.of("transcript")} >= SIDES


def heard_the_caller(srv: ServerProcess, call_id: str) -> None:
    """The server is receiving the caller's (non-silent) audio: the tiny STT puts out pieces
    for any frames it is fed, so this is what ties its pieces to the caller's sound."""
    def row():
        return [c for c in http_json(srv.ops_url + "/api/calls")[1]["calls"] if c["call_id"] == call_id]
    got = poll(row, lambda r: r and r[0]["caller_peak"] > 0.05, 10)
    assert got and got[0]["caller_peak"] > 0.05, got


def check_end(srv: ServerProcess, receiver: Receiver, stream: EventStream, call_id: str) -> dict:
    """After the call: the record has both sides, one signed webhook has the record's
    transcript, and what streamed live is that transcript, side by side."""
    assert stream.closed.wait(10) and stream.events[-1]["type"] == "end", stream.events[-3:]
    record = record_of(srv, call_id)
    assert {s["who"] for s in record["transcript"]} == SIDES, record["transcript"][:5]
    body = delivered_once(receiver, call_id)
    assert body["transcript"] == record["transcript"]
    for who in SIDES:
        assert joined(record["transcript"], who) and streamed(stream, who) == joined(record["transcript"], who), who
    return body


def test_sip_call_both_sides_live_then_in_the_record_and_one_signed_webhook(stt_server, receiver, tmp_path,
                                                                             spoken_wav):
    srv = stt_server
    ulaw = tmp_path / "caller_ulaw.wav"
    subprocess.run(["sox", str(spoken_wav), "-r", "8000", "-c", "1", "-e", "u-law", str(ulaw)], check=True)
    # uac_queue.xml as a plain call (no queue here): RTP for @PAUSE@ ms after the answer, then BYE
    caller = Sipp(srv.sip_port, SCENARIOS / "uac_queue.xml", "1001", tmp_path,
                  {"@RTP_FILE@": str(ulaw), "@PAUSE@": "6000", "@OPT183@": "true"}).start()
    stream = None
    try:
        live = poll(lambda: [c for c in http_json(srv.ops_url + "/api/calls")[1]["calls"]
                             if c["endpoint"] == "sip" and c["state"] == "live"], bool, 15)
        assert len(live) == 1, live
        call_id = live[0]["call_id"]
        stream = EventStream(f"{srv.ops_url}/api/calls/{call_id}/events")
        heard_the_caller(srv, call_id)
        # sipp talks for 6 s after the answer: both sides must stream before it hangs up
        assert poll(lambda: both_sides_streamed(stream) or stream.closed.is_set(), bool, 10)
        assert both_sides_streamed(stream), [e["type"] for e in stream.events]
        assert caller.proc.poll() is None and not stream.closed.is_set(), "the call ended before both sides streamed"
        assert "end" not in [e["type"] for e in stream.events]
        rc, msgs = caller.wait()
        assert rc == 0, msgs[-3000:]
        body = check_end(srv, receiver, stream, call_id)
    finally:
        caller.kill()
        if stream is not None:
            stream.close()
    assert body["endpoint"] == "sip" and body["reason"] == "caller_hangup"


def test_browser_call_both_sides_live_then_in_the_record_and_one_signed_webhook(stt_server, receiver, caller_wav):
    srv = stt_server
    out: dict = {}

    async def scenario():
        a = WebRtcCaller(srv.url, "citysan", caller_wav)
        stream = None
        try:
            assert await a.call() == 200, a.body
            out["call_id"] = call_id = a.body["call_id"]
            assert await until(lambda: len(a.received) >= 5, 30)  # answered
            stream = out["stream"] = EventStream(f"{srv.ops_url}/api/calls/{call_id}/events")
            await asyncio.get_running_loop().run_in_executor(None, heard_the_caller, srv, call_id)
            assert await until(lambda: both_sides_streamed(stream) or stream.closed.is_set(), 15)
            assert both_sides_streamed(stream), [e["type"] for e in stream.events]
            assert not stream.closed.is_set() and "end" not in [e["type"] for e in stream.events]
            await a.hangup()  # the caller hangs up only after both sides streamed
        finally:
            await a.close()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
        body = check_end(srv, receiver, out["stream"], out["call_id"])
    finally:
        loop.close()
        if "stream" in out:
            out["stream"].close()
    assert body["endpoint"] == "webrtc" and body["reason"] == "caller_hangup"
