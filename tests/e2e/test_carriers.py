"""Twilio Media Streams and Telnyx media streaming against the real server, with callers written
from the carriers' public protocol documents (tests/support/carriers.py)."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import numpy as np
import pytest

from telephony.streams.twilio import twilio_signature
from tests.support import poll
from tests.support.carriers import TwilioCaller, twilio_voice_params, twilio_webhook_post
from tests.support.server import ServerProcess, http_json, metric, no_calls

TOKEN = "test-auth-token-1234"
CITYSAN = "+14155550100"


@pytest.fixture(scope="module")
def carrier_server(tmp_path_factory, demo_dir):
    tmp = tmp_path_factory.mktemp("carriers")
    srv = ServerProcess(tmp, demo_dir.parent, {
        "engine": {"max_calls": 2, "retry_after_s": 4,
                   # the demo model speaks quietly: count it as speaking, so caller speech over it
                   # is a barge-in (the carrier-side reaction, `clear`, is what is tested here)
                   "barge_in": {"agent_active_dbfs": -70, "agent_guard_ms": 0}},
        "personas": {"unknown_numbers": "refuse"},
        "twilio": {"enabled": True}, "telnyx": {"enabled": True},
        "media_timeout_s": 2.0,
    }, env={"TWILIO_AUTH_TOKEN": TOKEN})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def call_end(srv, call_id_part: str | None = None, endpoint: str | None = None, n: int = 1) -> list[dict]:
    def ends():
        return [ln for ln in srv.lines() if ln.get("event") == "call_end"
                and (endpoint is None or ln.get("endpoint") == endpoint)]
    return poll(ends, lambda e: len(e) >= n, 10, step=0.1)



def loud(pcm: np.ndarray, thr: float = 0.01) -> bool:
    return len(pcm) > 0 and float(np.abs(pcm).max()) > thr


def test_twilio_webhook_answers_with_a_bidirectional_stream_and_checks_signatures(carrier_server):
    url = carrier_server.url + "/twilio/voice"
    bad_before = metric(carrier_server, 'personaplex_calls_total{endpoint="twilio",outcome="refused_bad_signature"}')
    params = twilio_voice_params(dialled=CITYSAN, caller="+14155550111")
    status, body = run(twilio_webhook_post(url, params, TOKEN))
    assert status == 200, body
    assert "<Connect><Stream url=\"wss://127.0.0.1:" not in body  # plain http here: ws://
    m = re.search(r'<Stream url="([^"]+)">', body)
    assert m and m.group(1) == carrier_server.ws_url + "/twilio/media"
    assert '<Parameter name="to" value="+14155550100" />' in body
    assert '<Parameter name="from" value="+14155550111" />' in body
    # forged, missing, or signed for other parameters: 403
    assert run(twilio_webhook_post(url, params, signature="AAAA"))[0] == 403
    assert run(twilio_webhook_post(url, params))[0] == 403
    assert run(twilio_webhook_post(url, dict(params, To="+19999999999"),
                                   signature=twilio_signature(TOKEN, url, params)))[0] == 403
    # a number nobody answers is rejected without answering
    status, body = run(twilio_webhook_post(url, twilio_voice_params(dialled="+15550001111"), TOKEN))
    assert status == 200 and '<Reject reason="rejected"' in body
    assert metric(carrier_server, 'personaplex_calls_total{endpoint="twilio",outcome="refused_bad_signature"}') \
        == bad_before + 3


def test_twilio_call_speech_both_ways_marks_dtmf_and_barge_in(carrier_server, spoken_wav):
    ws = carrier_server.ws_url + "/twilio/media"
    dtmf_before = metric(carrier_server, 'personaplex_dtmf_total{endpoint="twilio"}')
    caller = TwilioCaller(ws, parameters={"to": CITYSAN, "from": "+14155550111"}, wav_or_pcm=spoken_wav,
                          auth_token=TOKEN)

    async def scenario():
        task = asyncio.create_task(caller.run(5.0, dtmf=[(2.5, "7"), (3.0, "0")]))
        await caller.started.wait()
        live = await asyncio.get_running_loop().run_in_executor(
            None, lambda: poll(lambda: http_json(carrier_server.ops_url + "/api/calls")[1]["calls"],
                               lambda c: c and c[0]["frames_in"] > 20 and c[0]["caller_peak"] > 0.05, 10))
        await task
        return live

    live = run(scenario())
    assert live and live[0]["endpoint"] == "twilio" and live[0]["persona"] == "citysan"
    assert caller.protocol_errors == []
    assert loud(caller.agent_pcm) and caller.agent_seconds > 3.0  # the agent's audio, decoded
    assert len(caller.marks_received) >= 30  # a mark per agent frame
    assert caller.marks_sent_back  # and we saw them played
    assert no_calls(carrier_server)
    end = call_end(carrier_server, endpoint="twilio")[-1]
    assert end["reason"] == "caller_hangup" and end["frames_in"] > 40 and end["caller_peak"] > 0.05
    # barge-in: caller speech over the agent made it send `clear`, once per barge-in
    assert end["barge_ins"] >= 1 and len(caller.clears) == end["barge_ins"]
    # DTMF reached call control: counted per transport, and the transfer key is reported as
    # something a media stream cannot do (rather than silently ignored)
    assert metric(carrier_server, 'personaplex_dtmf_total{endpoint="twilio"}') == dtmf_before + 2
    assert any(ln.get("event") == "transfer_unsupported" and ln.get("endpoint") == "twilio"
               for ln in carrier_server.lines())


@pytest.mark.parametrize("encoding", ["PCMU", "L16"])
def test_telnyx_call_out_of_order_frames_dtmf_and_clear(carrier_server, spoken_wav, encoding):
    before = len(call_end(carrier_server, endpoint="telnyx", n=0))
    caller = carrier_server.telnyx_caller(dialled=CITYSAN, wav_or_pcm=spoken_wav,
                          encoding=encoding, shuffle=2, seed=3)
    run(caller.run(4.0, dtmf=[(2.0, "5")]))
    assert caller.protocol_errors == []
    assert loud(caller.agent_pcm) and caller.agent_seconds > 2.5
    end = call_end(carrier_server, endpoint="telnyx", n=before + 1)[-1]
    assert end["reason"] == "caller_hangup" and end["caller_peak"] > 0.05 and end["frames_in"] > 30
    assert end["barge_ins"] >= 1 and len(caller.clears) == end["barge_ins"]
    assert no_calls(carrier_server)


def test_telnyx_swapped_pairs_lose_nothing_and_a_missing_frame_is_counted(carrier_server):
    """20 ms PCMU frames in swapped pairs every 40 ms (Telnyx does not guarantee order) all
    reach the call: nothing is given up but the one frame that never comes, which is counted as
    lost, per call and in the metrics. (The engine's own latency bound, `caller_audio_dropped_s`,
    depends on how the demo model keeps up on this machine: not what this tests.)"""
    before = len(call_end(carrier_server, endpoint="telnyx", n=0))
    lost_before = metric(carrier_server, 'personaplex_caller_audio_lost_seconds_total{endpoint="telnyx",kind="reorder_gap"}')
    tone = (0.3 * np.sin(2 * np.pi * 300 * np.arange(8000 * 6) / 8000)).astype(np.float32)
    caller = carrier_server.telnyx_caller(dialled=CITYSAN, wav_or_pcm=tone)
    caller._send_order = lambda n: [i ^ 1 if (i ^ 1) < n else i for i in range(n)]  # 2,1,4,3,...
    caller.burst, caller.skip = 2, {151}
    run(caller.run(6.0))
    assert caller.protocol_errors == []
    end = call_end(carrier_server, endpoint="telnyx", n=before + 1)[-1]
    assert end["reason"] == "caller_hangup"
    assert end["caller_audio_lost"] == {"reorder_gap": 0.02} and end["caller_audio_lost_s"] == 0.02, end
    assert metric(carrier_server, 'personaplex_caller_audio_lost_seconds_total{endpoint="telnyx",kind="reorder_gap"}') \
        == pytest.approx(lost_before + 0.02)


def test_refusals_close_the_stream_with_carrier_codes(carrier_server):
    busy_before = metric(carrier_server, 'personaplex_calls_total{endpoint="telnyx",outcome="refused_busy"}')
    unknown_before = metric(carrier_server, 'personaplex_calls_total{endpoint="twilio",outcome="refused_not_found"}')
    unknown = TwilioCaller(carrier_server.ws_url + "/twilio/media", parameters={"to": "+15550001111"},
                           auth_token=TOKEN)
    run(unknown.run(1.0))
    assert unknown.close_code == 1008 and unknown.closed_by_server
    unsigned = carrier_server.ws_url + "/twilio/media"

    async def upgrade():
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(unsigned):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status
    assert run(upgrade()) == 403

    # two calls hold both slots: the third is busy (1013, try again later)
    holders = [carrier_server.telnyx_caller(dialled=CITYSAN) for _ in range(2)]
    third = carrier_server.telnyx_caller(dialled=CITYSAN)

    async def scenario():
        tasks = [asyncio.create_task(h.run(3.0)) for h in holders]
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: poll(lambda: http_json(carrier_server.url + "/readyz")[1]["capacity_left"],
                               lambda c: c == 0, 10))
        await third.run(1.0)
        await asyncio.gather(*tasks)
    run(scenario())
    assert third.close_code == 1013 and third.closed_by_server
    assert all(loud(h.agent_pcm) for h in holders)
    assert metric(carrier_server, 'personaplex_calls_total{endpoint="telnyx",outcome="refused_busy"}') \
        == busy_before + 1
    assert metric(carrier_server, 'personaplex_calls_total{endpoint="twilio",outcome="refused_not_found"}') \
        == unknown_before + 1
    assert no_calls(carrier_server)


async def closed(ws, timeout: float = 10) -> tuple[int | None, int]:
    """Read (and drop: the agent's media) until the server closes; its close code and how many
    frames came before."""
    n = 0
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                return ws.close_code, n
            n += 1


def test_malformed_frames_are_ignored_and_never_hurt_another_call(carrier_server):
    good = carrier_server.telnyx_caller(dialled=CITYSAN)

    async def hostile():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(carrier_server.ws_url + "/telnyx/media", max_msg_size=0,
                                       headers={"x-telnyx-streaming-auth-token": carrier_server.telnyx_token}) as ws:
                await ws.send_str('{"event": "media", "media": {"payload": "AAAA"}}')  # media before start
                await ws.send_str("{not json")
                await ws.send_str(json.dumps({"event": "party", "x": 1}))  # an unknown event
                await ws.send_str(json.dumps({"event": "connected", "version": "1.0.0"}))
                await ws.send_str(json.dumps({
                    "event": "start", "sequence_number": "1", "stream_id": "s1",
                    "start": {"call_control_id": "c1", "to": CITYSAN, "from": "+1",
                              "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}}))
                await ws.send_str(json.dumps({"event": "media", "stream_id": "s1",
                                              "media": {"payload": "%%%not-base64%%%", "chunk": "1"}}))
                await ws.send_str("x" * (1024 * 1024))  # 1 MB: over the frame limit, the socket closes
                return await closed(ws)

    async def scenario():
        task = asyncio.create_task(good.run(4.0))
        await good.started.wait()
        await asyncio.sleep(0.5)
        code = await hostile()
        await task
        return code
    code, _ = run(scenario())
    assert code == 1009  # message too big: that stream (and only it) is closed
    assert good.protocol_errors == [] and loud(good.agent_pcm) and good.agent_seconds > 3.0
    assert http_json(carrier_server.url + "/healthz")[0] == 200
    events = [ln.get("event") for ln in carrier_server.lines()]
    assert events.count("stream_bad_frame") >= 3
    assert no_calls(carrier_server)


def test_a_carrier_that_goes_quiet_is_hung_up(carrier_server):
    before = len(call_end(carrier_server, endpoint="telnyx", n=0))
    caller = carrier_server.telnyx_caller(dialled=CITYSAN)

    async def scenario():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(carrier_server.ws_url + "/telnyx/media", headers=caller.headers) as ws:
                await ws.send_str(json.dumps(caller._start()))  # starts, then never sends media
                return await closed(ws, 15)
    code, _ = run(scenario())
    assert code == 1000
    assert call_end(carrier_server, endpoint="telnyx", n=before + 1)[-1]["reason"] == "media_timeout"
