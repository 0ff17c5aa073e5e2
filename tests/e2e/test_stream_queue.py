"""The call queue for carrier streams and the browser (issue 23): one slot, `queue.max_waiting: 2`.

A Twilio caller waits while a first call holds the slot, hears hold audio (media frames at the
carrier's 20 ms pace, u-law 8 kHz, nothing from the model), is answered when the first hangs up,
and what it says from then on reaches the model; a Telnyx caller that drops its socket while
waiting is counted abandoned; the Twilio webhook connects a caller while the queue has room and
rejects one when it is full; a WebRTC caller waits (the data channel says its place) and is
answered; at SIGTERM a waiting carrier stream is closed with 1013 (try again later). One server
for the module: the SIGTERM test is last and stops it."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import numpy as np
import pytest

from tests.support import poll, speechlike
from tests.support.carriers import twilio_voice_params, twilio_webhook_post
from tests.support.server import ServerProcess, http_json, metric, wait_caller_heard
from tests.support.sip_trace import log_time

CITYSAN = "+14155550100"
PACKET_S = 0.040  # what the agent sends a carrier: 40 ms media frames (telephony.streams.base)
PACKET_SAMPLES = 320  # u-law 8 kHz


@pytest.fixture(scope="module")
def srv(tmp_path_factory, demo_dir):
    tmp = tmp_path_factory.mktemp("streamqueue")
    server = ServerProcess(tmp, demo_dir.parent, {
        "engine": {"max_calls": 1, "retry_after_s": 7},
        "twilio": {"enabled": True}, "telnyx": {"enabled": True},
        "queue": {"max_waiting": 2, "max_wait_s": 30},
        "recording": {"enabled": True, "dir": str(tmp / "rec")},
        "drain_timeout_s": 2, "media_timeout_s": 5,
    })
    server.rec_dir = tmp / "rec"
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def depth(srv) -> float:
    return metric(srv, "personaplex_queue_depth")


def outcome(srv, endpoint: str, what: str) -> float:
    return metric(srv, f'personaplex_queue_outcomes_total{{endpoint="{endpoint}",outcome="{what}"}}')


async def until(pred, timeout: float, step: float = 0.05) -> bool:
    """Bounded wait inside the event loop (the clients run there)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


async def depth_is(srv, n: int, timeout: float = 10.0) -> bool:
    return await until(lambda: depth(srv) == n, timeout, step=0.1)


def test_twilio_caller_holds_hears_hold_audio_and_is_answered_telnyx_leaver_is_abandoned(srv):
    voice = srv.url + "/twilio/voice"
    first = srv.twilio_caller(parameters={"to": CITYSAN, "from": "+14155550001"})
    waiter = srv.twilio_caller(parameters={"to": CITYSAN, "from": "+14155550002"},
                               wav_or_pcm=speechlike(12.0, 3, sr=8000))
    leaver = srv.telnyx_caller(dialled=CITYSAN, caller="+13125550003")
    times: dict[str, float] = {}

    async def scenario():
        a = asyncio.create_task(first.run(5.0))
        assert await until(lambda: first.marks_received, 20), "the first call never went live"
        # the slot is busy, the queue empty: the webhook still connects (the caller would wait)
        status, body = await twilio_webhook_post(voice, twilio_voice_params(dialled=CITYSAN), srv.twilio_token)
        assert status == 200 and "<Connect>" in body, body
        b = asyncio.create_task(waiter.run(11.0))
        assert await depth_is(srv, 1)
        c = asyncio.create_task(leaver.run(1.5, hangup=False))  # then the socket just closes
        assert await depth_is(srv, 2)
        # slot and queue full: not ready, and the webhook rejects busy (as without a queue)
        status, ready = http_json(srv.ops_url + "/readyz")
        assert status == 503 and ready["queue_waiting"] == 2, ready
        status, body = await twilio_webhook_post(voice, twilio_voice_params(dialled=CITYSAN), srv.twilio_token)
        assert status == 200 and '<Reject reason="busy"' in body, body
        # and a stream that starts anyway is refused as without a queue (1013, try again later)
        extra = srv.twilio_caller(parameters={"to": CITYSAN, "from": "+14155550004"})
        await asyncio.wait_for(extra.run(3.0), 10)
        assert extra.closed_by_server and extra.close_code == 1013 and not extra.agent_media, extra.close_code
        await c
        assert await depth_is(srv, 1, 5), "the Telnyx caller that left is still queued"
        status, ready = http_json(srv.ops_url + "/readyz")
        assert status == 200, ready  # room in the queue again
        await a
        times["first_closed"] = time.monotonic()
        await b

    run(scenario())
    assert leaver.close_code is not None and not leaver.closed_by_server
    assert outcome(srv, "telnyx", "abandoned") == 1
    assert outcome(srv, "twilio", "answered") == 1
    assert depth(srv) == 0
    assert not waiter.protocol_errors and not first.protocol_errors, (waiter.protocol_errors, first.protocol_errors)

    # on hold: media frames (no marks: nothing of the agent's) at the live 40 ms pace
    live_at = waiter.marks_received[0][0]  # the first agent frame's mark
    hold = [m for m in waiter.agent_media if m.at < live_at - 0.1]
    assert all(m.samples == PACKET_SAMPLES for m in hold)
    held_s = hold[-1].at - hold[0].at
    assert held_s > 2.0, held_s
    rate = (len(hold) - 1) / held_s
    assert 0.9 / PACKET_S < rate < 1.1 / PACKET_S, rate  # ~25 packets a second, like live audio
    gaps = np.diff([m.at for m in hold])
    assert float(np.median(gaps)) == pytest.approx(PACKET_S, abs=0.006), np.median(gaps)
    # the hold chime plays from its start: its first notes are audible, not silence
    pcm = waiter.agent_pcm[: int(0.8 * 8000)]
    assert float(np.sqrt(np.mean(pcm ** 2))) > 0.01

    # answered when the first call's slot freed; its first agent frame within a few frames
    answered_after = (waiter._t0 + live_at) - times["first_closed"]
    print(f"\nfirst caller's socket closed -> queued Twilio caller's first agent frame: {answered_after * 1000:.0f} ms")
    assert answered_after < 2.0, answered_after
    dequeued = [x for x in srv.lines() if x.get("event") == "call_dequeued"]
    assert len(dequeued) == 1 and dequeued[0]["endpoint"] == "twilio", dequeued
    end = poll(lambda: [x for x in srv.lines() if x.get("event") == "call_end" and x.get("endpoint") == "twilio"],
               lambda e: len(e) >= 2, 10)
    waited = [x for x in end if "queue_wait_s" in x]
    assert len(waited) == 1 and waited[0]["queue_wait_s"] > 2.0, end
    # what the caller said once answered reached the model: ~every 80 ms frame of the rest of the call
    talk_s = 11.0 - live_at
    assert waited[0]["frames_in"] >= 0.8 * talk_s / 0.08, (waited[0]["frames_in"], talk_s)
    assert waited[0]["caller_audio_lost_s"] == 0, waited[0]
    # the agent's first frame within two ticks of taking the slot, as for any call
    assert waited[0]["answer_ticks"] <= 2 + (waited[0]["engine_overruns"] > 0), waited[0]
    # the record is written after call_end (its audio first): wait for it
    queued = poll(lambda: [r for r in (json.loads(p.read_text()) for p in srv.rec_dir.glob("*.json"))
                           if r.get("queue_wait_s")], lambda q: len(q) >= 1, 10)
    assert len(queued) == 1 and queued[0]["queue_wait_s"] == waited[0]["queue_wait_s"], queued


def _wav(path, pcm: np.ndarray, rate: int):
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def test_webrtc_callers_wait_see_their_place_move_and_are_answered_or_leave(srv, tmp_path):
    from tests.support.webrtc_client import WebRtcCaller

    wav = _wav(tmp_path / "caller48k.wav", speechlike(20.0, 5, sr=48000), 48000)
    first = srv.twilio_caller(parameters={"to": CITYSAN, "from": "+14155550021"})
    b = WebRtcCaller(srv.url, "citysan", wav=str(wav))
    c = WebRtcCaller(srv.url, "citysan")
    before = outcome(srv, "webrtc", "answered"), outcome(srv, "webrtc", "abandoned")
    got: dict[str, float] = {}

    async def scenario():
        a = asyncio.create_task(first.run(5.0))
        assert await until(lambda: first.marks_received, 20), "the first call never went live"
        assert await b.call() == 200 and b.body["queued"] and b.body["position"] == 1, b.body
        assert "call_id" not in b.body
        assert await c.call() == 200 and c.body["position"] == 2, c.body
        assert await until(lambda: {"type": "queue", "position": 1} in b.events, 10), b.events
        assert await until(lambda: {"type": "queue", "position": 2} in c.events, 10), c.events
        # hold audio on the outbound track while waiting (no call yet: no state message)
        assert await until(lambda: b.loud() > 20, 10), b.loud()
        got["hold_loud"] = b.loud()
        assert "state" not in b.kinds()
        await a
        got["first_closed"] = time.monotonic()
        assert await until(lambda: "state" in b.kinds(), 10), b.events
        got["b_state"] = time.monotonic()
        # the next caller moved up
        assert await until(lambda: {"type": "queue", "position": 1} in c.events, 5), c.events
        assert "state" not in c.kinds()
        await c.hangup(timeout=0.5)  # leaves the queue (no "ended": it never had a call)
        assert await depth_is(srv, 0, 5)
        assert await until(lambda: {"type": "state", "state": "live"} in b.events, 10), b.events
        heard = len(b.received)
        assert await until(lambda: len(b.received) > heard + 100, 10)  # the call goes on (2 s more)
        await b.hangup()

    run(scenario())
    hello = next(e for e in b.events if e.get("type") == "state")
    assert hello.get("call_id") and hello["persona"] == "citysan", hello
    print(f"\nfirst caller's socket closed -> queued browser caller's first state message: "
          f"{(got['b_state'] - got['first_closed']) * 1000:.0f} ms")
    assert outcome(srv, "webrtc", "answered") == before[0] + 1
    assert outcome(srv, "webrtc", "abandoned") == before[1] + 1
    end = poll(lambda: [x for x in srv.lines() if x.get("event") == "call_end" and x.get("call_id") == hello["call_id"]],
               lambda e: len(e) == 1, 10)
    assert end and end[0]["queue_wait_s"] > 1.0 and end[0]["frames_in"] > 10, end
    assert end[0]["answer_ticks"] <= 2 + (end[0]["engine_overruns"] > 0), end[0]


def test_the_page_shows_its_place_in_the_queue_then_goes_live(srv, tmp_path):
    import shutil

    from playwright.sync_api import sync_playwright

    from tests.support import require

    require("chromium")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    wav = _wav(tmp_path / "mic.wav", speechlike(20.0, 7, sr=48000), 48000)
    first = srv.twilio_caller(parameters={"to": CITYSAN, "from": "+14155550031"})
    import threading

    done = threading.Event()
    holder = threading.Thread(target=lambda: (run(first.run(6.0)), done.set()), daemon=True)
    holder.start()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            "--autoplay-policy=no-user-gesture-required"])
        try:
            poll(lambda: first.marks_received, bool, 20, step=0.05)
            assert first.marks_received, "the first call never went live"
            page = browser.new_page()
            page.goto(srv.url + "/")
            page.wait_for_selector("#persona option[value=citysan]", state="attached")
            page.select_option("#persona", "citysan")
            page.click("#call")
            page.wait_for_function("window.__call.state === 'queued'", timeout=20000)
            text = page.inner_text("#status")
            assert "All agents are busy, you are number 1" in text, text
            assert not done.is_set()
            page.wait_for_function("window.__call.state === 'live'", timeout=20000)
            assert page.inner_text("#status") == "In call."
            page.wait_for_function("window.__call.agentLoudFrames > 2", timeout=20000)
            # the microphone reaches the model through the connection that waited
            call = wait_caller_heard(srv)
            assert call["endpoint"] == "webrtc" and call["frames_in"] > 10 and call["caller_peak"] > 0.05, call
            page.click("#hangup")
            assert poll(lambda: http_json(srv.ops_url + "/api/calls")[1]["calls"], lambda c: c == [], 15) == []
        finally:
            browser.close()
    holder.join(10)
    # taken off the queue only once the first call's slot freed
    lines = srv.lines()
    dequeued = [x for x in lines if x.get("event") == "call_dequeued" and x.get("endpoint") == "webrtc"]
    first_end = [x for x in lines if x.get("event") == "call_end" and x.get("endpoint") == "twilio"]
    assert dequeued and first_end and log_time(dequeued[-1]) >= log_time(first_end[-1]) - 0.05, (dequeued, first_end)


def test_sigterm_refuses_waiting_callers_carrier_1013_browser_refused_message(srv):
    """Last in this module: it stops the shared server."""
    from tests.support.webrtc_client import WebRtcCaller

    live = srv.twilio_caller(parameters={"to": CITYSAN, "from": "+14155550011"})
    held = srv.telnyx_caller(dialled=CITYSAN, caller="+13125550012")
    page = WebRtcCaller(srv.url, "citysan")

    async def scenario():
        a = asyncio.create_task(live.run(30.0))
        assert await until(lambda: live.marks_received, 20), "the live call never went live"
        b = asyncio.create_task(held.run(30.0))
        assert await depth_is(srv, 1)
        assert await page.call() == 200 and page.body["position"] == 2, page.body
        assert await until(lambda: len(held.agent_media) > 10 and "queue" in page.kinds(), 10), "no hold"
        sent = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        await b
        took = time.monotonic() - sent
        assert await until(lambda: "refused" in page.kinds(), 5), page.events
        await page.close()
        await a  # the live call drains as before (hung up at the drain timeout)
        return took

    took = run(scenario())
    assert held.closed_by_server and held.close_code == 1013, held.close_code
    assert took < 1.5, took  # at once, not after the live call's drain
    refusal = next(e for e in page.events if e.get("type") == "refused")
    assert refusal["error"] == "draining" and refusal["retry_after"] == 7, refusal
    assert live.closed_by_server
    assert srv.proc.wait(30) == 0
    lines = srv.lines()
    drain = next(log_time(x) for x in lines if x.get("event") == "draining")
    assert not [x for x in lines if x.get("event") == "call_dequeued" and log_time(x) >= drain]
    assert [x["refusal"] for x in lines if x.get("event") == "stream_refused"][-1] == "draining"
