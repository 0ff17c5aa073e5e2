"""Twilio Media Streams frames, TwiML and request signatures (telephony.streams.twilio).

Sample frames follow the shapes on Twilio's "Media Streams - WebSocket Messages" page (ids and
payloads are ours)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
from xml.etree import ElementTree as ET

import numpy as np
import pytest

from telephony.audio.codecs import mulaw_decode, mulaw_encode
from telephony.streams.events import (AudioFormat, Connected, DtmfIn, Ignored, MarkIn, MediaIn,
                               MediaStreamProtocol, Started, Stopped, WireError)
from telephony.streams.twilio import (TwilioStream, connect_stream_twiml, reject_twiml, twilio_signature,
                              valid_signature)

from tests.support.carriers import serve_locally

SID = "MZ" + "0" * 31 + "1"
CALL = "CA" + "0" * 31 + "2"
ACCOUNT = "AC" + "0" * 31 + "3"
TONE = (0.3 * np.sin(2 * np.pi * 400 * np.arange(160) / 8000)).astype(np.float32)


def connected() -> str:
    return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def start(params: dict | None = None, **over) -> str:
    body = {"accountSid": ACCOUNT, "streamSid": SID, "callSid": CALL, "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": {"From": "+14155550111", "to": "+14155550100", "persona": "acme"}
            if params is None else params}
    body.update(over)
    return json.dumps({"event": "start", "sequenceNumber": "1", "start": body, "streamSid": SID})


def media(n: int, payload: str | None = None, **over) -> str:
    m = {"track": "inbound", "chunk": str(n), "timestamp": str(20 * n),
         "payload": payload if payload is not None else base64.b64encode(mulaw_encode(TONE)).decode()}
    m.update(over)
    return json.dumps({"event": "media", "sequenceNumber": str(n + 1), "media": m, "streamSid": SID})


def started() -> TwilioStream:
    s = TwilioStream()
    assert isinstance(s.parse(connected()), Connected)
    assert isinstance(s.parse(start()), Started)
    return s


def test_implements_the_protocol():
    s: MediaStreamProtocol = TwilioStream()
    assert s.name == "twilio" and s.reorders is False


def test_start_frame_gives_ids_format_and_parameters():
    ev = TwilioStream().parse(start())
    assert ev == Started(stream_id=SID, call_id=CALL, audio=AudioFormat("mulaw", 8000, 1),
                         parameters={"From": "+14155550111", "to": "+14155550100", "persona": "acme"},
                         caller="+14155550111", dialled="+14155550100", account_id=ACCOUNT)


def test_start_without_from_to_or_media_format():
    body = {"streamSid": SID, "callSid": CALL}
    ev = TwilioStream().parse(json.dumps({"event": "start", "start": body}))
    assert isinstance(ev, Started) and ev.caller is None and ev.dialled is None and ev.parameters == {}
    assert ev.audio == AudioFormat("mulaw", 8000, 1)


def test_media_dtmf_mark_stop():
    s = started()
    ev = s.parse(media(1))
    assert isinstance(ev, MediaIn) and ev.seq == 1 and ev.pcm.dtype == np.float32 and len(ev.pcm) == 160
    assert np.max(np.abs(ev.pcm - TONE)) < 0.01
    dtmf = {"event": "dtmf", "streamSid": SID, "sequenceNumber": "5",
            "dtmf": {"track": "inbound_track", "digit": "1"}}
    assert s.parse(json.dumps(dtmf)) == DtmfIn("1")
    mark = {"event": "mark", "sequenceNumber": "4", "streamSid": SID, "mark": {"name": "my label"}}
    assert s.parse(json.dumps(mark)) == MarkIn("my label")
    stop = {"event": "stop", "sequenceNumber": "5", "streamSid": SID,
            "stop": {"accountSid": ACCOUNT, "callSid": CALL}}
    assert isinstance(s.parse(json.dumps(stop)), Stopped)
    assert isinstance(s.parse(media(2)), Ignored)  # after stop: nothing to play it to


def test_unknown_events_and_other_tracks_are_ignored():
    s = started()
    assert s.parse(json.dumps({"event": "someFutureEvent", "x": 1})) == Ignored("someFutureEvent")
    assert isinstance(s.parse(media(1, track="outbound")), Ignored)


def _b64(n: int) -> str:
    return base64.b64encode(bytes(n)).decode()


@pytest.mark.parametrize("frame, message", [
    ("not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('"media"', "JSON object"),
    ("{}", "event"),
    ('{"event": 5}', "event"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),  # nesting too deep for the parser
])
def test_malformed_frames(frame, message):
    with pytest.raises(WireError, match=message):
        started().parse(frame)


@pytest.mark.parametrize("frame, message", [
    (media(1, payload="%%%not base64%%%"), "base64"),
    (media(1, payload="AAA"), "base64"),  # bad padding
    (media(1, payload=_b64(70 * 1024)), "more than"),
    (media(1, payload=_b64(1024 * 1024)), "over the .* limit"),  # 1 MB: refused before json.loads
    (media(1, payload=12), "string"),
    (media(1, chunk="one"), "chunk"),
    (json.dumps({"event": "media", "streamSid": SID}), "media"),
    (json.dumps({"event": "media", "streamSid": SID, "media": "x"}), "object"),
    (json.dumps({"event": "media", "streamSid": "MZother", "media": {"payload": ""}}), "streamSid"),
    (json.dumps({"event": "dtmf", "streamSid": SID, "dtmf": {"digit": "12"}}), "DTMF"),
    (json.dumps({"event": "dtmf", "streamSid": SID, "dtmf": {}}), "digit"),
    (json.dumps({"event": "mark", "streamSid": SID, "mark": {"name": 3}}), "name"),
    (start(), "second 'start'"),
])
def test_malformed_fields_after_start(frame, message):
    with pytest.raises(WireError, match=message):
        started().parse(frame)


@pytest.mark.parametrize("frame, message", [
    (media(1), "before 'start'"),
    (start(params={"n": 5}), "string"),
    (start(callSid=None), "callSid"),
    (start(callSid=7), "callSid"),
    (start(mediaFormat={"encoding": "audio/x-alaw", "sampleRate": 8000}), "audio/x-alaw"),
    (start(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": 16000}), "16000"),
    (start(tracks="inbound"), "tracks"),
    (json.dumps({"event": "start", "start": {"callSid": CALL}}), "streamSid"),
    (json.dumps({"event": "start", "streamSid": "MZa", "start": {"streamSid": "MZb", "callSid": CALL}}), "differs"),
    (json.dumps({"event": "start"}), "start"),
])
def test_malformed_frames_before_start(frame, message):
    with pytest.raises(WireError, match=message):
        TwilioStream().parse(frame)


def test_parse_raises_nothing_but_wire_error():
    """Random corruptions of valid frames either parse or raise WireError, never anything else."""
    rng = random.Random(7)
    frames = [connected(), start(), media(1), media(2, payload=""),
              json.dumps({"event": "mark", "streamSid": SID, "mark": {"name": "m"}})]
    junk = [None, 0, -1, 1.5, True, "", "x", [], {}, [1], {"a": None}, "A" * 5000]
    for _ in range(3000):
        obj = json.loads(rng.choice(frames))
        node = obj
        path = []
        while isinstance(node, dict) and node and rng.random() < 0.7:
            key = rng.choice(list(node))
            path.append((node, key))
            node = node[key]
        if path:
            parent, key = path[-1]
            if rng.random() < 0.2:
                del parent[key]
            else:
                parent[key] = rng.choice(junk)
        text = json.dumps(obj)
        if rng.random() < 0.1:
            text = text[: rng.randrange(len(text))]
        s = started() if rng.random() < 0.7 else TwilioStream()
        try:
            s.parse(text)
        except WireError:
            pass


def test_outbound_frames_have_twilios_shape():
    s = started()
    out = json.loads(s.encode_media(TONE))
    assert set(out) == {"event", "streamSid", "media"} and out["event"] == "media" and out["streamSid"] == SID
    assert set(out["media"]) == {"payload"}
    raw = base64.b64decode(out["media"]["payload"], validate=True)
    assert len(raw) == 160 and np.max(np.abs(mulaw_decode(raw) - TONE)) < 0.01
    assert json.loads(s.encode_mark("m-1")) == {"event": "mark", "streamSid": SID, "mark": {"name": "m-1"}}
    assert json.loads(s.encode_clear()) == {"event": "clear", "streamSid": SID}


def test_nothing_is_sent_before_start():
    with pytest.raises(RuntimeError):
        TwilioStream().encode_media(TONE)
    with pytest.raises(RuntimeError):
        TwilioStream().encode_clear()


# ---- TwiML ---------------------------------------------------------------------------------------

HOSTILE = {
    "quote": 'a"b',
    "apos": "it's",
    "markup": '"/><Hangup/><Parameter name="x" value="',
    "amp": "a&b&amp;c",
    "angle": "<script>alert(1)</script>",
    "unicode": "Zoë ☎ 日本",
    "spaces": "  two  spaces\tand tab\nnewline ",
    'na"me<&>': "v",
}


def test_connect_stream_twiml_escapes_hostile_parameters():
    xml = connect_stream_twiml("wss://agent.example.com/twilio/stream", HOSTILE)
    assert xml.startswith('<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="wss://')
    root = ET.fromstring(xml)
    assert root.tag == "Response" and [c.tag for c in root] == ["Connect"]
    (stream,) = list(root[0])
    assert stream.tag == "Stream" and stream.get("url") == "wss://agent.example.com/twilio/stream"
    assert all(p.tag == "Parameter" for p in stream)
    assert {p.get("name"): p.get("value") for p in stream} == HOSTILE  # exact, whitespace included
    assert "<Hangup" not in xml.replace("&lt;Hangup", "")


def test_connect_stream_twiml_refuses_what_twilio_cannot_take():
    with pytest.raises(ValueError, match="query"):
        connect_stream_twiml("wss://agent.example.com/s?token=1", {})
    with pytest.raises(ValueError):
        connect_stream_twiml("https://agent.example.com/s", {})
    with pytest.raises(ValueError, match="U\\+0000"):
        connect_stream_twiml("wss://agent.example.com/s", {"a": "x\x00y"})
    with pytest.raises(ValueError):
        connect_stream_twiml("wss://agent.example.com/s", {"a": 5})  # type: ignore[dict-item]


def test_reject_twiml():
    assert reject_twiml() == '<?xml version="1.0" encoding="UTF-8"?><Response><Reject reason="busy" /></Response>'
    assert ET.fromstring(reject_twiml("rejected"))[0].attrib == {"reason": "rejected"}
    with pytest.raises(ValueError):
        reject_twiml('busy"/><Dial>')


# ---- signatures ----------------------------------------------------------------------------------

DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = {"CallSid": "CA1234567890ABCDE", "Caller": "+12349013030", "Digits": "1234",
              "From": "+12349013030", "To": "+18005551212"}


def test_signature_known_answer_from_twilios_docs():
    """The worked example of Twilio's "Webhooks security" page (auth token 12345)."""
    assert twilio_signature("12345", DOC_URL, DOC_PARAMS) == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    assert valid_signature("12345", DOC_URL, DOC_PARAMS, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=")


def _independent(token: str, data: str) -> str:
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def test_signature_sorts_case_sensitively_and_repeats_values():
    params = {"b": "2", "B": "1", "a": ["z", "y"], "Ä": "ü"}
    expected = _independent("tok", "https://x.example/v" + "B1" + "ay" + "az" + "b2" + "Äü")
    assert twilio_signature("tok", "https://x.example/v", params) == expected
    assert twilio_signature("tok", "https://x.example/v", {}) == _independent("tok", "https://x.example/v")


def test_valid_signature_rejects_tampering():
    sig = twilio_signature("12345", DOC_URL, DOC_PARAMS)
    assert not valid_signature("12345", DOC_URL, {**DOC_PARAMS, "Digits": "9999"}, sig)
    assert not valid_signature("12345", DOC_URL.replace("bar=2", "bar=3"), DOC_PARAMS, sig)
    assert not valid_signature("54321", DOC_URL, DOC_PARAMS, sig)
    assert not valid_signature("12345", DOC_URL, DOC_PARAMS, sig[:-1])
    assert not valid_signature("12345", DOC_URL, DOC_PARAMS, "")
    assert not valid_signature("12345", DOC_URL, DOC_PARAMS, None)
    assert not valid_signature("12345", DOC_URL, DOC_PARAMS, "ünicode")


def test_valid_signature_accepts_url_with_or_without_default_port():
    sig = twilio_signature("12345", "https://mycompany.com:443/myapp.php", DOC_PARAMS)
    assert valid_signature("12345", "https://mycompany.com/myapp.php", DOC_PARAMS, sig)
    sig = twilio_signature("12345", "https://mycompany.com/myapp.php", DOC_PARAMS)
    assert valid_signature("12345", "https://mycompany.com:443/myapp.php", DOC_PARAMS, sig)
    assert not valid_signature("12345", "https://other.com/myapp.php", DOC_PARAMS, sig)


# ---- the test caller (tests/support/carriers.py) against this module, over a loopback socket ------

async def test_twilio_caller_speaks_what_twilio_stream_parses():
    from aiohttp import web

    from tests.support.carriers import TwilioCaller

    seen: list = []

    async def agent(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        proto, sent = TwilioStream(), 0
        async for m in ws:
            ev = proto.parse(m.data)
            seen.append(ev)
            if isinstance(ev, MediaIn):
                sent += 1
                await ws.send_str(proto.encode_media(ev.pcm))  # echo the caller
                if sent == 5:
                    await ws.send_str(proto.encode_mark("five"))
                if sent == 8:
                    await ws.send_str(proto.encode_mark("eight"))
                    await ws.send_str(proto.encode_clear())  # barge-in: "eight" comes back at once
                if sent == 10:
                    await ws.send_str(proto.encode_mark("ten"))
            if isinstance(ev, Stopped):
                break
        return ws

    runner, port = await serve_locally(agent)
    try:
        caller = TwilioCaller(f"ws://127.0.0.1:{port}/twilio", parameters={"to": "+14155550100", "x": 'q"<'},
                              wav_or_pcm=np.tile(TONE, 30))
        await caller.run(0.5, dtmf=[(0.1, "7")])
    finally:
        await runner.cleanup()

    assert caller.protocol_errors == [] and not caller.closed_by_server and caller.close_code == 1000
    assert isinstance(seen[0], Connected) and isinstance(seen[-1], Stopped)
    st = seen[1]
    assert isinstance(st, Started) and st.stream_id == caller.stream_sid and st.call_id == caller.call_sid
    assert st.dialled == "+14155550100" and st.parameters["x"] == 'q"<'
    media_in = [e for e in seen if isinstance(e, MediaIn)]
    assert [e.seq for e in media_in] == list(range(1, caller.frames_sent + 1)) and caller.frames_sent == 25
    assert DtmfIn("7") in seen
    assert len(caller.agent_pcm) >= 160 * 10 and np.max(np.abs(caller.agent_pcm[:160] - TONE)) < 0.02
    assert [n for _, n in caller.marks_received] == ["five", "eight", "ten"]
    assert [n for _, n in caller.marks_sent_back] == ["five", "eight", "ten"]
    (clear_at,) = caller.clears
    back = dict((n, t) for t, n in caller.marks_sent_back)
    assert back["eight"] == pytest.approx(clear_at, abs=0.01)  # dropped by the clear: at once
    assert back["ten"] >= dict((n, t) for t, n in caller.marks_received)["ten"]
    assert [e.name for e in seen if isinstance(e, MarkIn)] == ["five", "eight", "ten"]


async def test_twilio_caller_records_the_agent_hanging_up():
    from aiohttp import web

    from tests.support.carriers import TwilioCaller

    async def agent(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        proto = TwilioStream()
        async for m in ws:
            if isinstance(proto.parse(m.data), Started):
                await ws.close(code=1000)
        return ws

    runner, port = await serve_locally(agent)
    try:
        caller = TwilioCaller(f"ws://127.0.0.1:{port}/twilio")
        await asyncio.wait_for(caller.run(5.0), 3.0)  # returns early
    finally:
        await runner.cleanup()
    assert caller.closed_by_server and caller.close_code == 1000 and caller.frames_sent < 50


async def test_twilio_webhook_post_is_signed_like_twilio():
    from aiohttp import web

    from tests.support.carriers import twilio_voice_params, twilio_webhook_post

    async def voice(request):
        form = await request.post()
        ok = valid_signature("secret", str(request.url), dict(form), request.headers.get("X-Twilio-Signature"))
        if not ok:
            return web.Response(status=403)
        return web.Response(text=connect_stream_twiml("wss://agent.example.com/s", {"to": form["To"]}),
                            content_type="text/xml")

    runner, port = await serve_locally(voice)
    try:
        url = f"http://127.0.0.1:{port}/twilio/voice"
        params = twilio_voice_params(caller="+14155550111", dialled="+14155550100")
        status, body = await twilio_webhook_post(url, params, auth_token="secret")
        assert status == 200 and ET.fromstring(body)[0][0][0].get("value") == "+14155550100"
        assert (await twilio_webhook_post(url, params, auth_token="wrong"))[0] == 403
        assert (await twilio_webhook_post(url, params))[0] == 403
    finally:
        await runner.cleanup()


async def test_twilio_caller_plays_a_wav_file_at_8k(tmp_path):
    from agent.audio_io import write_wav
    from tests.support.carriers import TwilioCaller

    path = tmp_path / "caller.wav"
    write_wav(path, (0.3 * np.sin(2 * np.pi * 500 * np.arange(4800) / 24000)).astype(np.float32), 24000)
    caller = TwilioCaller("ws://127.0.0.1:9/unused", wav_or_pcm=path)
    assert caller.rate == 8000 and len(caller.caller_pcm) == 1600  # 0.2 s resampled to 8 kHz
