"""Telnyx media streaming frames (telephony.streams.telnyx) and in-order release (telephony.streams.reorder).

Sample frames follow the shapes on Telnyx's "Media Streaming over Websockets" guide and the
"Stream call media over WebSocket" AsyncAPI page (ids and payloads are ours)."""

from __future__ import annotations

import base64
import json
import random

import numpy as np
import pytest

from telephony.audio.codecs import mulaw_encode
from telephony.streams.reorder import Reorderer
from telephony.streams.events import (AudioFormat, Connected, DtmfIn, Ignored, MarkIn, MediaIn,
                               MediaStreamProtocol, Started, Stopped, WireError)
from telephony.streams.telnyx import TelnyxStream

STREAM = "32DE0DEA-53CB-4B21-89A4-9E1819C043BC"
CCID = "v3:T02llQxIyaRkhfRKxgAP8nY511EhFLizdvdUKJiSw8d6A9BborherQ"


def tone(rate: int, n: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 400 * np.arange(n) / rate)).astype(np.float32)


def start(encoding: str = "PCMU", rate: int = 8000, **over) -> str:
    body = {"user_id": "3E6F995F-85F7-4705-9741-53B116D28237", "call_control_id": CCID,
            "call_session_id": "ff55a038-6f5d-11ef-9692-02420aeffb1f", "from": "+13122010094",
            "to": "+13122123456", "tags": ["TAG1"], "client_state": "aGF2ZSBhIG5pY2UgZGF5ID1d",
            "custom_parameters": {"customer_id": "customer_123"},
            "media_format": {"encoding": encoding, "sample_rate": rate, "channels": 1}}
    body.update(over)
    return json.dumps({"event": "start", "sequence_number": "1", "start": body, "stream_id": STREAM})


def media(chunk: int, payload: bytes | str, seq: int | None = None, **over) -> str:
    p = payload if isinstance(payload, str) else base64.b64encode(payload).decode()
    m = {"track": "inbound", "chunk": str(chunk), "timestamp": str(20 * chunk), "payload": p}
    m.update(over)
    return json.dumps({"event": "media", "sequence_number": str(seq if seq is not None else chunk + 1),
                       "media": m, "stream_id": STREAM})


def started(encoding: str = "PCMU", rate: int = 8000, **kw) -> TelnyxStream:
    s = TelnyxStream(**kw)
    assert isinstance(s.parse(json.dumps({"event": "connected", "version": "1.0.0"})), Connected)
    assert isinstance(s.parse(start(encoding, rate)), Started)
    return s


def test_implements_the_protocol():
    s: MediaStreamProtocol = TelnyxStream()
    assert s.name == "telnyx" and s.reorders is True


def test_connected_may_carry_the_streaming_auth_token():
    s = TelnyxStream()
    ev = s.parse(json.dumps({"event": "connected", "version": "1.0.0", "x-telnyx-streaming-auth-token": "tok"}))
    assert ev == Connected("tok")
    assert s.parse(json.dumps({"event": "connected", "version": "1.0.0"})) == Connected(None)


def test_start_frame():
    ev = TelnyxStream().parse(start())
    assert ev == Started(stream_id=STREAM, call_id=CCID, audio=AudioFormat("mulaw", 8000, 1),
                         parameters={"customer_id": "customer_123"}, caller="+13122010094",
                         dialled="+13122123456")


def test_start_variants_from_older_pages_and_the_command_form():
    ev = TelnyxStream().parse(start("audio/x-mulaw", custom_parameters=[{"name": "a", "value": "1"}]))
    assert ev.audio == AudioFormat("mulaw", 8000, 1) and ev.parameters == {"a": "1"}
    bare = {"call_control_id": CCID, "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}
    ev = TelnyxStream().parse(json.dumps({"event": "start", "start": bare, "stream_id": STREAM}))
    assert ev.caller is None and ev.dialled is None and ev.parameters == {}


def test_pcmu_media_dtmf_mark_error_stop():
    s = started()
    pcm = tone(8000, 160)
    ev = s.parse(media(1, mulaw_encode(pcm)))
    assert isinstance(ev, MediaIn) and ev.seq == 1 and len(ev.pcm) == 160 and np.max(np.abs(ev.pcm - pcm)) < 0.01
    dtmf = {"event": "dtmf", "stream_id": STREAM, "occurred_at": "2025-06-05T08:54:19.698408Z",
            "sequence_number": "5", "dtmf": {"digit": "1"}}
    assert s.parse(json.dumps(dtmf)) == DtmfIn("1")
    mark = {"event": "mark", "stream_id": STREAM, "sequence_number": "5", "mark": {"name": "some_mark_name"}}
    assert s.parse(json.dumps(mark)) == MarkIn("some_mark_name")
    err = {"event": "error", "payload": {"code": 100003, "title": "malformed_frame",
                                         "detail": "Received frame was not formed correctly"}, "stream_id": STREAM}
    ev = s.parse(json.dumps(err))
    assert isinstance(ev, Ignored) and "100003" in ev.event and "malformed_frame" in ev.event
    assert "not formed correctly" in ev.event and s.errors == [ev.event]
    assert isinstance(s.parse(json.dumps({"event": "error"})), Ignored)
    stop = {"event": "stop", "sequence_number": "6", "stop": {"user_id": "u", "call_control_id": CCID},
            "stream_id": STREAM}
    assert isinstance(s.parse(json.dumps(stop)), Stopped)
    assert isinstance(s.parse(media(2, mulaw_encode(pcm))), Ignored)  # late frame after stop


def test_media_seq_is_the_chunk_not_the_frame_counter():
    s = started()
    assert s.parse(media(7, b"\xff" * 160, seq=42)).seq == 7
    no_chunk = json.dumps({"event": "media", "sequence_number": "9", "media": {"payload": ""}})
    assert s.parse(no_chunk).seq == 9


def test_l16_16k_is_big_endian_both_ways():
    s = started("L16", 16000)
    pcm = tone(16000, 320)
    wire_bytes = (np.rint(pcm * 32768).astype(">i2")).tobytes()
    ev = s.parse(media(1, wire_bytes))
    assert isinstance(ev, MediaIn) and np.array_equal(ev.pcm, np.rint(pcm * 32768).astype(np.float32) / 32768)
    out = json.loads(s.encode_media(ev.pcm))
    assert base64.b64decode(out["media"]["payload"]) == wire_bytes


def test_l16_byte_order_can_be_switched():
    s = started("L16", 16000, l16_byteorder="little")
    ev = s.parse(media(1, np.array([1, 256], "<i2").tobytes()))
    assert (ev.pcm * 32768).tolist() == [1.0, 256.0]


def test_outbound_frames_have_telnyx_shape():
    s = started()
    out = json.loads(s.encode_media(tone(8000, 160)))
    assert out == {"event": "media", "media": {"payload": out["media"]["payload"]}}  # no stream_id
    assert len(base64.b64decode(out["media"]["payload"], validate=True)) == 160
    assert json.loads(s.encode_mark("m1")) == {"event": "mark", "mark": {"name": "m1"}}
    assert json.loads(s.encode_clear()) == {"event": "clear"}
    with pytest.raises(RuntimeError):
        TelnyxStream().encode_media(tone(8000, 160))


def test_outbound_format_may_differ_from_inbound():
    s = TelnyxStream(outbound=AudioFormat("l16", 16000))
    s.parse(start())
    out = json.loads(s.encode_media(np.zeros(320, np.float32)))
    assert len(base64.b64decode(out["media"]["payload"])) == 640


@pytest.mark.parametrize("encoding", ["PCMA", "G722", "OPUS", "AMR-WB"])
def test_unsupported_encodings_are_named(encoding):
    with pytest.raises(WireError, match=encoding):
        TelnyxStream().parse(start(encoding))


@pytest.mark.parametrize("frame, message", [
    (start("PCMU", 16000), "8000"),
    (start("L16", 11025), "11025"),
    (start(media_format={"encoding": "PCMU", "sample_rate": 8000, "channels": 2}), "channels"),
    (start(media_format={"sample_rate": 8000}), "encoding"),
    (start(media_format=None), "media_format"),
    (start(call_control_id=None), "call_control_id"),
    (start(custom_parameters={"n": 1}), "string"),
    (start(custom_parameters=[1]), "name"),
    (start(to=5), "'to'"),
    (json.dumps({"event": "start", "start": {"call_control_id": CCID}}), "stream_id"),
    (media(1, b"\xff" * 160), "before 'start'"),
    ('{"event": "media"', "JSON"),
    ("[]", "object"),
])
def test_malformed_before_start(frame, message):
    with pytest.raises(WireError, match=message):
        TelnyxStream().parse(frame)


@pytest.mark.parametrize("frame, message", [
    (media(1, "@@@@"), "base64"),
    (media(1, bytes(1024 * 1024)), "limit"),
    (media(1, bytes(100 * 1024)), "more than"),
    (media(1, b"\x00\x01\x02"), "odd"),  # L16 needs whole samples
    (media(-1, b""), "chunk"),
    (json.dumps({"event": "media", "stream_id": "other", "media": {"payload": ""}}), "stream_id"),
    (json.dumps({"event": "dtmf", "dtmf": {"digit": "x"}}), "DTMF"),
    (json.dumps({"event": "mark", "mark": {}}), "name"),
    (start(), "second 'start'"),
])
def test_malformed_after_start(frame, message):
    with pytest.raises(WireError, match=message):
        started("L16", 16000).parse(frame)


def test_parse_raises_nothing_but_wire_error():
    rng = random.Random(11)
    frames = [start(), start("L16", 16000), media(1, b"\xff" * 160), media(2, b"\x00\x00"),
              json.dumps({"event": "error", "payload": {"code": 1, "title": "t", "detail": "d"}})]
    junk = [None, 0, -3, 2.5, False, "", "PCMA", [], {}, [{"name": 1}], "B" * 5000]
    for _ in range(3000):
        obj = json.loads(rng.choice(frames))
        node, path = obj, []
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
        s = started(*rng.choice([("PCMU", 8000), ("L16", 16000)])) if rng.random() < 0.7 else TelnyxStream()
        try:
            s.parse(json.dumps(obj))
        except WireError:
            pass


# ---- Reorderer -----------------------------------------------------------------------------------

def f(seq: int | None) -> MediaIn:
    return MediaIn(np.full(4, 0 if seq is None else seq, np.float32), seq=seq)


def feed(r: Reorderer, seqs) -> list[int | None]:
    out = []
    for s in seqs:
        out += [m.seq for m in r.push(f(s))]
    return out


def test_in_order_frames_pass_straight_through():
    r = Reorderer()
    for s in range(1, 50):
        assert [m.seq for m in r.push(f(s))] == [s]
    assert r.waiting == 0 and r.stats.released == 49 and r.stats.reordered == 0


def test_swapped_frames_come_out_in_order():
    r = Reorderer()
    assert feed(r, [1, 3, 2, 4, 6, 5, 7]) == [1, 2, 3, 4, 5, 6, 7]
    assert r.stats.reordered == 2 and r.stats.gaps_skipped == 0


def test_a_first_frame_that_was_overtaken_is_waited_for():
    r = Reorderer()
    assert feed(r, [2, 1, 3]) == [1, 2, 3]


def test_a_lost_frame_is_skipped_after_the_window():
    r = Reorderer(window=3)
    assert feed(r, [1, 3, 4, 5]) == [1]  # 2 might still come
    assert r.waiting == 3
    assert feed(r, [6]) == [3, 4, 5, 6]  # more than 3 waiting: 2 is given up
    assert r.stats.gaps_skipped == 1
    assert feed(r, [2, 7]) == [7]  # 2 arriving now is too late
    assert r.stats.dropped_late == 1


def test_a_frame_overtaken_by_a_whole_window_is_still_used():
    r = Reorderer(window=3)
    assert feed(r, [1, 3, 4, 5, 2]) == [1, 2, 3, 4, 5]


def test_duplicates_and_old_frames_are_dropped():
    r = Reorderer()
    assert feed(r, [1, 2, 2, 1, 4, 4, 3]) == [1, 2, 3, 4]
    # 2 and 1 again come after their release (late); the second 4 while the first waits.
    assert r.stats.dropped_late == 2 and r.stats.dropped_duplicate == 1


def test_a_jump_forward_costs_one_window_then_flows():
    r = Reorderer(window=2)
    assert feed(r, [1, 2, 100, 101]) == [1, 2]
    assert feed(r, [102]) == [100, 101, 102]
    assert feed(r, [103]) == [103] and r.stats.gaps_skipped == 97


def test_flush_releases_what_waits_in_order():
    r = Reorderer()
    assert feed(r, [1, 4, 3]) == [1]
    assert [m.seq for m in r.flush()] == [3, 4] and r.waiting == 0
    assert feed(r, [5]) == [5]


def test_unnumbered_frames_pass_through_and_baseline_from_first_frame():
    r = Reorderer(first=None)
    assert feed(r, [None, 10, 11, None, 13, 12]) == [None, 10, 11, None, 12, 13]
    assert r.stats.unnumbered == 2


def test_memory_is_bounded_by_the_window():
    r = Reorderer(window=3)
    rng = random.Random(3)
    seqs = list(range(1, 2001))
    for i in range(0, len(seqs) - 1, 2):  # swap neighbours, lose some, duplicate some
        if rng.random() < 0.3:
            seqs[i], seqs[i + 1] = seqs[i + 1], seqs[i]
    seqs = [s for s in seqs if rng.random() > 0.05]
    seqs += rng.sample(seqs, 50)
    out = []
    for s in seqs:
        out += [m.seq for m in r.push(f(s))]
        assert r.waiting <= 3
    out += [m.seq for m in r.flush()]
    assert out == sorted(set(out))  # strictly increasing: in order, no duplicates
    with pytest.raises(ValueError):
        Reorderer(window=0)


# ---- the test caller (tests/support/carriers.py) against this module, over a loopback socket ------

async def _agent_server(seen: list, reorder: bool = True):
    from aiohttp import web

    async def agent(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        proto, reorderer, played = TelnyxStream(), Reorderer(), 0
        async for m in ws:
            ev = proto.parse(m.data)
            seen.append(ev)
            frames = (reorderer.push(ev) if reorder else [ev]) if isinstance(ev, MediaIn) else []
            for fr in frames:
                seen.append(("played", fr.seq))
                played += 1
                await ws.send_str(proto.encode_media(fr.pcm))
                if played == 4:
                    await ws.send_str(proto.encode_mark("four"))
                if played == 6:
                    await ws.send_str(proto.encode_clear())
            if isinstance(ev, Stopped):
                for fr in reorderer.flush():
                    seen.append(("played", fr.seq))
                break
        return ws

    from tests.support.carriers import serve_locally

    return await serve_locally(agent)


async def test_telnyx_caller_l16_shuffled_is_put_back_in_order():
    from tests.support.carriers import TelnyxCaller

    seen: list = []
    runner, port = await _agent_server(seen)
    pcm = tone(16000, 16000)
    try:
        caller = TelnyxCaller(f"ws://127.0.0.1:{port}/telnyx", encoding="L16", wav_or_pcm=pcm, shuffle=2,
                              seed=5, parameters={"persona": "acme"}, auth_token="tok")
        await caller.run(0.4, dtmf=[(0.1, "#")])
    finally:
        await runner.cleanup()

    assert caller.protocol_errors == [] and not caller.closed_by_server
    st = seen[1]
    assert isinstance(st, Started) and st.audio == AudioFormat("l16", 16000, 1)
    assert st.caller == caller.caller and st.dialled == caller.dialled and st.parameters == {"persona": "acme"}
    arrived = [e.seq for e in seen if isinstance(e, MediaIn)]
    assert arrived != sorted(arrived) and sorted(arrived) == list(range(1, 21))  # shuffled on the wire
    assert [s for kind, s in (x for x in seen if isinstance(x, tuple))] == list(range(1, 21))  # in order
    assert DtmfIn("#") in seen
    # The agent echoed in order, so the caller hears its own audio back, sample for sample.
    heard = caller.agent_pcm
    assert len(heard) >= 320 * 10
    assert np.max(np.abs(heard - np.rint(pcm[:len(heard)] * 32768) / 32768)) < 1e-6
    assert [n for _, n in caller.marks_sent_back] == ["four"] and len(caller.clears) == 1


async def test_telnyx_caller_pcmu_default():
    from tests.support.carriers import TelnyxCaller

    seen: list = []
    runner, port = await _agent_server(seen, reorder=False)
    try:
        caller = TelnyxCaller(f"ws://127.0.0.1:{port}/telnyx", wav_or_pcm=tone(8000, 8000))
        await caller.run(0.2)
    finally:
        await runner.cleanup()
    assert caller.protocol_errors == [] and seen[1].audio == AudioFormat("mulaw", 8000, 1)
    assert [e.seq for e in seen if isinstance(e, MediaIn)] == list(range(1, 11))
    assert isinstance(seen[-1], Stopped) and len(caller.agent_pcm) >= 9 * 160  # the last echo may miss the close


def test_a_stream_numbered_from_zero_loses_nothing():
    r = Reorderer()  # assumes 1
    assert feed(r, [0, 1, 2]) == [0, 1, 2]
    r = Reorderer()
    assert feed(r, [5, 6, 7]) == []  # waits for 1..4 a window long
    assert feed(r, [8]) == [5, 6, 7, 8] and r.stats.gaps_skipped == 4
