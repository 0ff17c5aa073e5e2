"""Server runtime: the config-check CLI, drain on SIGTERM, metrics, bound log fields, call records,
persona edits while the server runs, thread dumps on SIGUSR1."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import numpy as np
import pytest

from tests.support import ROOT, poll
from tests.support.server import ServerProcess, http_json, http_text, metric
from tests.support.webrtc_client import WebRtcCaller


def test_config_check_cli(tmp_path, capsys):
    from server.cli.main import main

    assert main(["config-check", str(ROOT / "configs" / "demo.yaml")]) == 0
    (tmp_path / "x.yaml").write_text("engine: {max_calls: -1}\n")
    assert main(["config-check", str(tmp_path / "x.yaml")]) == 2
    assert "engine.max_calls" in capsys.readouterr().err


_open_callers: list[WebRtcCaller] = []


def caller(url: str, persona: str, wav: str | None = None) -> WebRtcCaller:
    """A WebRTC caller that `run` closes at the end whatever happened (a peer connection left
    open keeps the test process alive)."""
    c = WebRtcCaller(url, persona, wav)
    _open_callers.append(c)
    return c


def run(coro):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        while _open_callers:
            c = _open_callers.pop()
            try:
                loop.run_until_complete(asyncio.wait_for(c.close(), 10))
            except Exception:
                pass
        loop.close()


async def until(cond, timeout: float, step: float = 0.05):
    """`cond()` once it holds, or its last value after `timeout` s (bounded waits, in a loop)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(step)


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


#: Agent frames (80 ms) a call that reached `talking` has surely sent: the caller heard 25 frames
#: of 20 ms, some of which may be the receiver's own fill before the first packet.
TALKED_FRAMES = 4


async def talking(caller: WebRtcCaller, frames: int = 25, timeout: float = 20.0) -> None:
    """Wait until the caller has heard `frames` 20 ms frames of the agent's sound (the track's
    silence does not count)."""
    assert await until(lambda: caller.loud() >= frames, timeout), (caller.loud(), len(caller.received))


async def goes_on(caller: WebRtcCaller, frames: int, timeout: float = 10.0) -> None:
    """The call goes on: the caller hears `frames` more 20 ms frames of the agent's sound (not
    merely packets: the track sends silence every 20 ms anyway)."""
    start = len(caller.received)
    assert await until(lambda: caller.loud(start) > frames, timeout), (caller.loud(start), len(caller.received) - start)


async def hang_up(caller: WebRtcCaller) -> None:
    """Hang up from the page's side and close once the server said the call ended (its last
    message), not after a guessed delay."""
    caller.channel.send(json.dumps({"type": "hangup"}))
    assert await until(lambda: "ended" in caller.kinds(), 10), caller.kinds()
    await caller.close()


def talk_and_hang_up(srv, number: str, caller_wav: str) -> str:
    """One whole browser call to `number`: answered, the agent heard, hung up by the page.
    Returns its call id."""
    async def scenario():
        a = caller(srv.url, number, caller_wav)
        assert await a.call() == 200, a.body
        await talking(a)
        await hang_up(a)
        return a.body["call_id"]
    return run(scenario())


def log_events(srv, event: str, **match) -> list[dict]:
    return [ln for ln in srv.lines() if ln.get("event") == event and all(ln.get(k) == v for k, v in match.items())]


def test_drain_keeps_calls_refuses_new_then_exits(tmp_path, demo_dir, caller_wav):
    srv = ServerProcess(tmp_path, demo_dir.parent, {"engine": {"max_calls": 2}, "drain_timeout_s": 20})

    async def scenario():
        a = caller(srv.url, "citysan", caller_wav)
        assert await a.call() == 200
        await talking(a)
        srv.proc.send_signal(signal.SIGTERM)
        # new calls are refused while draining, readiness says so
        status, ready = await in_thread(poll, lambda: http_json(srv.ops_url + "/readyz"), lambda r: r[1].get("draining"),
                                        10)
        assert status == 503 and ready["draining"]
        b = caller(srv.url, "citysan", caller_wav)
        assert await b.call() == 503 and b.body["error"] == "draining"
        metrics = await in_thread(http_text, srv.ops_url + "/metrics")
        # the call in progress survives the signal
        await goes_on(a, 40)  # 0.8 s of the agent's sound
        assert a.kinds().count("ended") == 0
        await hang_up(a)
        return metrics

    try:
        srv.wait_ready()
        metrics = run(scenario())
        assert srv.proc.wait(20) == 0  # the last call ended: drain completes, exit 0
    finally:
        srv.stop()
    lines = srv.lines()
    (end,) = [ln for ln in lines if ln.get("event") == "call_end"]
    assert end["reason"] == "caller_hangup" and end["frames_in"] > 10 and end["frames_out"] > 10
    # every line of the call carries its bound fields
    call_lines = [ln for ln in lines if ln.get("call_id") == end["call_id"]]
    assert len(call_lines) >= 2
    for ln in call_lines:
        assert ln["persona"] == "citysan" and ln["endpoint"] == "webrtc" and ln["number"] == "citysan"
    for key in ("duration_s", "frames_in", "frames_out", "late_frames", "barge_ins", "reason"):
        assert key in end
    # metrics exposed the counters while the call ran
    assert 'personaplex_active_calls{endpoint="webrtc"} 1.0' in metrics
    assert 'personaplex_calls_total{endpoint="webrtc",outcome="refused_draining"} 1.0' in metrics
    assert "personaplex_engine_step_seconds_count" in metrics
    assert "personaplex_answer_to_first_audio_seconds_count 1.0" in metrics
    assert "personaplex_prefill_seconds_count" in metrics


@pytest.mark.slow
def test_drain_timeout_hangs_up_politely_and_second_signal_is_immediate(tmp_path, demo_dir, caller_wav):
    srv = ServerProcess(tmp_path, demo_dir.parent, {"drain_timeout_s": 1.0})

    async def scenario():
        a = caller(srv.url, "teacher", caller_wav)
        assert await a.call() == 200
        await talking(a)
        srv.proc.send_signal(signal.SIGTERM)
        await until(lambda: "ended" in a.kinds(), 15)
        ended = [e for e in a.events if e.get("type") == "ended"]
        await a.close()
        return ended

    try:
        srv.wait_ready()
        ended = run(scenario())
        assert ended and ended[0]["reason"] == "shutdown"  # told, not just cut off
        assert srv.proc.wait(15) == 0
    finally:
        srv.stop()

    # a second signal exits at once: long before a drain that would take a minute
    (tmp_path / "two").mkdir()
    srv2 = ServerProcess(tmp_path / "two", demo_dir.parent, {"drain_timeout_s": 60})

    async def hold():
        a = caller(srv2.url, "teacher", caller_wav)
        assert await a.call() == 200
        await talking(a)
        srv2.proc.send_signal(signal.SIGTERM)
        assert await in_thread(poll, lambda: log_events(srv2, "draining"), bool, 10)  # the first one was taken
        srv2.proc.send_signal(signal.SIGTERM)
        code = await in_thread(srv2.proc.wait, 30)  # half the drain timeout, on any machine
        await a.close()
        return code

    try:
        srv2.wait_ready()
        assert run(hold()) == 1
        assert log_events(srv2, "second_signal_exit_now")
        assert not log_events(srv2, "stopped") and not log_events(srv2, "call_end")  # no drain, no hang-up
    finally:
        srv2.stop(expect_exit=1)


def test_unknown_persona_and_bad_offer(tmp_path, demo_dir):
    srv = ServerProcess(tmp_path, demo_dir.parent, {"personas": {"unknown_numbers": "refuse"}})
    try:
        srv.wait_ready()

        async def scenario():
            a = caller(srv.url, "nobody-here")
            assert await a.call() == 404 and a.body["error"] == "not_found"
            import aiohttp

            async with aiohttp.ClientSession() as http:
                async with http.post(srv.url + "/api/call", data=b"not json") as r:
                    assert r.status == 400
                async with http.post(srv.url + "/api/call", json={"sdp": "v=0\r\n", "type": "offer"}) as r:
                    assert r.status == 400
        run(scenario())
        status, body = http_json(srv.ops_url + "/readyz")
        assert status == 200 and body["capacity_left"] == body["max_calls"]
        assert http_json(srv.url + "/readyz") == (200, {"ready": True, "capacity_left": body["max_calls"]})
        assert http_json(srv.url + "/healthz") == (200, {"status": "ok"})
        assert metric(srv, 'personaplex_calls_total{endpoint="webrtc",outcome="refused_not_found"}') == 1
    finally:
        srv.stop()


# -- call records and persona edits: one server with recording on --------------------------------------
MAX_RECORDS = 2


@pytest.fixture(scope="module")
def rec_server(tmp_path_factory, demo_dir):
    tmp = tmp_path_factory.mktemp("records")
    srv = ServerProcess(tmp, demo_dir.parent, {
        "engine": {"max_calls": 2},
        "personas": {"reload_interval_s": 0.2},
        "recording": {"enabled": True, "dir": str(tmp / "rec"), "max_files": MAX_RECORDS},
    })
    srv.rec = tmp / "rec"
    srv.personas = tmp / "personas"
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def record_of(srv, call_id: str, timeout: float = 10.0) -> dict:
    """The JSON record of a call (waits for it: records are written after the call ends)."""
    paths = poll(lambda: list(srv.rec.glob(f"*-{call_id}.json")), bool, timeout)
    assert paths, (call_id, sorted(p.name for p in srv.rec.glob("*")))
    meta = json.loads(paths[0].read_text())
    meta["_path"] = paths[0]
    return meta


def personas_served(srv) -> dict:
    return {p["id"]: p for p in http_json(srv.ops_url + "/api/personas")[1]["personas"]}


def edit_persona(srv, name: str, **replace: str) -> str:
    """Rewrite personas/NAME.yaml with text replacements; returns the original text."""
    path = srv.personas / f"{name}.yaml"
    original = path.read_text()
    text = original
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return original


def restore_persona(srv, name: str, original: str) -> None:
    """Put the original file back and wait until the server serves it again (no problem
    reported, its voice back): the next test must not start from a version still in flight."""
    (srv.personas / f"{name}.yaml").write_text(original)
    voice = re.search(r"^voice: *(\S+)", original, re.M).group(1)
    body = poll(lambda: http_json(srv.ops_url + "/api/personas")[1], lambda b: not b["problems"]
                and any(p["id"] == name and p["voice"] == voice for p in b["personas"]), 10)
    assert not body["problems"] and any(p["id"] == name and p["voice"] == voice for p in body["personas"]), body


CITYSAN_PROMPT = ("You work for CitySan Services which is a waste management and your name is Ayelen Lucero. "
                  "Information: Verify customer name Omar Torres. Current schedule: every other week. Upcoming "
                  "pickup: April 12th. Compost bin service available for $8/month add-on.")


def _envelope_db(x: np.ndarray, rate: int, hop_s: float = 0.02) -> np.ndarray:
    n = int(rate * hop_s)
    k = len(x) // n
    return 10 * np.log10((x[:k * n].reshape(k, n) ** 2).mean(1) + 1e-10)


def _envelope_match(a: np.ndarray, b: np.ndarray, max_lag: int = 100, window: int = 100) -> float:
    """How well b follows a's loudness contour (20 ms frames): b cut into 2 s windows, each
    window's best Pearson correlation with a lagging or leading it by up to 2 s (transport
    delay, audio before the answer), the median over windows. Per window, so that one late
    tick on a loaded machine (a cut that shifts everything after it) costs one window, not all."""
    scores = []
    for start in range(0, len(b) - window + 1, window):
        y = b[start:start + window]
        best = -1.0
        for lag in range(-max_lag, max_lag):
            lo = start - lag
            x, yy = a[max(lo, 0):lo + window], y[max(-lo, 0):]
            n = min(len(x), len(yy))
            if n >= 50 and x[:n].std() > 0 and yy[:n].std() > 0:
                best = max(best, float(np.corrcoef(x[:n], yy[:n])[0, 1]))
        if best > -1.0:  # a window past the end of what was sent has nothing to follow
            scores.append(best)
    return float(np.median(scores)) if scores else -1.0


def _spectrum_distance(a: np.ndarray, b: np.ndarray) -> float:
    """How far apart two 24 kHz signals' long-term spectra are (100 Hz - 8 kHz): the RMS, in dB,
    of the difference of their log spectra, each level-normalised. A distance, not a correlation:
    the demo agent's noise has a nearly flat spectrum, and two flat spectra correlate only
    through their small ripples (seen from 0.5 to 0.8), while their distance stays small."""
    from scipy.signal import welch

    def spec(x):
        f, pxx = welch(x, 24000, nperseg=512)
        db = 10 * np.log10(pxx[(f > 100) & (f < 8000)] + 1e-12)
        return db - db.mean()
    return float(np.sqrt(np.mean((spec(a) - spec(b)) ** 2)))


def test_call_record_channels_transcript_prompt_and_retention(rec_server, caller_wav, tmp_path):
    """The record of a call: left = what the caller sent (its loudness contour), right = what
    the caller received (its spectrum; the demo agent's noise has no contour), the text pieces
    the caller received, the prompt the call had; beyond recording.max_files the oldest
    records are deleted."""
    import sphn
    from scipy.signal import resample_poly

    srv = rec_server
    # the sentence three times (~8.5 s), so the 12 s call's record has several windows of it
    once, rate = sphn.read(caller_wav)
    talk = str(tmp_path / "talk.wav")
    sphn.write_wav(talk, np.tile(once, 3), rate)

    async def one_call(frames: int) -> WebRtcCaller:
        a = caller(srv.url, "citysan", talk)
        assert await a.call() == 200, a.body
        await talking(a, frames)
        await hang_up(a)
        return a

    calls = [run(one_call(n)) for n in (25, 25, 150)]  # the last one long enough to compare its audio
    first, a = calls[0], calls[-1]
    metas = [record_of(srv, c.body["call_id"]) for c in calls[1:]]
    # retention: only the newest MAX_RECORDS records are kept, the first call's is gone
    assert poll(lambda: list(srv.rec.glob(f"*-{first.body['call_id']}.*")), lambda found: not found, 10) == []
    assert sorted(p.name for p in srv.rec.glob("*.json")) == sorted(m["_path"].name for m in metas)
    assert sorted(p.name for p in srv.rec.glob("*.wav")) == sorted(m["_path"].with_suffix(".wav").name for m in metas)
    assert not list(srv.rec.glob("*.tmp"))
    # the last call's record, checked against what its caller sent and received
    meta = metas[-1]
    assert meta["channels"] == {"left": "caller", "right": "agent"} and meta["persona"] == "citysan"
    assert meta["prompt"] == CITYSAN_PROMPT
    # the transcript: both sides' segments in order; the agent's words are what the caller was sent
    segments = meta["transcript"]
    assert segments and all(set(seg) == {"who", "t0", "t1", "text"} and seg["who"] in ("agent", "caller")
                            and seg["t1"] > seg["t0"] for seg in segments), segments[:3]
    assert [seg["t0"] for seg in segments] == sorted(seg["t0"] for seg in segments)
    heard_texts = [e["text"] for e in a.events if e.get("type") == "text"]
    heard = "".join("".join(heard_texts).split())
    said = "".join("".join(seg["text"] for seg in segments if seg["who"] == "agent").split())
    assert len(heard_texts) >= 10 and heard and said.startswith(heard), (heard[:100], said[:100])
    assert isinstance(meta["events"], list) and meta["dtmf"] == "" and meta["transfer"] is None
    pcm, sr = sphn.read(str(meta["_path"].with_suffix(".wav")))
    assert sr == 24000 and pcm.shape[0] == 2
    left, right = pcm[0], pcm[1]
    sent, sent_rate = sphn.read(talk)
    sent = resample_poly(sent[0], 1, sent_rate // 24000)
    received = resample_poly(np.concatenate(a.received), 1, 2)  # the caller's track is 48 kHz
    sent_env = _envelope_db(sent, 24000)
    sent_in_left = _envelope_match(sent_env, _envelope_db(left, 24000))
    sent_in_right = _envelope_match(sent_env, _envelope_db(right, 24000))
    # measured 0.67-0.85 and 0.23-0.37 (Opus both ways, a loaded machine's late ticks)
    assert sent_in_left > 0.55 and sent_in_left > sent_in_right + 0.2, (sent_in_left, sent_in_right)
    from_right, from_left = _spectrum_distance(received, right), _spectrum_distance(received, left)
    # measured 6.3-6.9 dB and 8.6-9.1 dB; and the agent's channel carries sound (a silent one
    # would have the flattest spectrum of all)
    assert from_right < from_left, (from_right, from_left)
    assert float(np.sqrt(np.mean(right ** 2))) > 0.01


def test_persona_edit_reaches_the_next_call_and_not_the_call_in_progress(rec_server, caller_wav):
    """An operator edits a persona's prompt and voice while a call to it is up: the next call
    gets the new version through the engine (its start line names the new voice, its record the
    new prompt); the call in progress keeps the version it started with."""
    srv = rec_server

    async def scenario():
        a = caller(srv.url, "citysan", caller_wav)
        assert await a.call() == 200, a.body
        await talking(a)
        original = edit_persona(srv, "citysan", **{"Upcoming pickup: April 12th.": "Upcoming pickup: May 3rd.",
                                                   "voice: NATF2": "voice: NATM1"})
        try:
            assert await in_thread(poll, lambda: personas_served(srv)["citysan"]["voice"], lambda v: v == "NATM1",
                                   10) == "NATM1"
            b = caller(srv.url, "citysan", caller_wav)
            assert await b.call() == 200, b.body
            await talking(b)
            await goes_on(a, 25)  # the first call went on meanwhile
            await hang_up(b)
            await hang_up(a)
        finally:
            await in_thread(restore_persona, srv, "citysan", original)
        return a.body["call_id"], b.body["call_id"]

    first, second = run(scenario())
    old, new = record_of(srv, first), record_of(srv, second)
    assert old["prompt"] == CITYSAN_PROMPT
    assert new["prompt"] == CITYSAN_PROMPT.replace("April 12th", "May 3rd")
    assert [ln["voice"] for ln in log_events(srv, "call_start", call_id=first)] == ["NATF2"]
    assert [ln["voice"] for ln in log_events(srv, "call_start", call_id=second)] == ["NATM1"]
    for call_id in (first, second):
        (end,) = log_events(srv, "call_end", call_id=call_id)
        assert end["reason"] == "caller_hangup" and end["frames_out"] >= TALKED_FRAMES, end


def test_broken_persona_edit_is_reported_and_last_good_serves(rec_server, caller_wav):
    """A broken edit (a new fact and an unknown voice) is reported and counted; a call placed
    after it is answered by the last good version: its prompt without the new fact, its voice."""
    srv = rec_server
    errors_before = metric(srv, "personaplex_persona_reload_errors_total")
    original = edit_persona(srv, "citysan", **{"Upcoming pickup: April 12th.": "Upcoming pickup: May 3rd.",
                                               "voice: NATF2": "voice: NOPE"})
    try:
        body = poll(lambda: http_json(srv.ops_url + "/api/personas")[1], lambda b: b["problems"], 10)
        assert any("unknown voice 'NOPE'" in pr for pr in body["problems"]), body["problems"]
        assert metric(srv, "personaplex_persona_reload_errors_total") == errors_before + 1

        call_id = talk_and_hang_up(srv, "+1 (415) 555-0100", caller_wav)
    finally:
        restore_persona(srv, "citysan", original)
    meta = record_of(srv, call_id)
    assert meta["persona"] == "citysan" and meta["prompt"] == CITYSAN_PROMPT  # not "May 3rd"
    assert [ln["voice"] for ln in log_events(srv, "call_start", call_id=call_id)] == ["NATF2"]
    (end,) = log_events(srv, "call_end", call_id=call_id)
    assert end["reason"] == "caller_hangup" and end["frames_out"] >= TALKED_FRAMES, end


#: What faulthandler writes for `kill -USR1` (plain text on stderr, not a log event): allowed in
#: the log check of the test that asks for it. Python's tracebacks write `line N, in f` (with a
#: comma), so these do not hide a traceback.
THREAD_DUMP = [r"^(Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):$",
               r'^  File ".*", line \d+ in \S+$', r"^  <no Python frame>$", r"^  \.\.\.$",
               r"^  Garbage-collecting$"]


def test_sigusr1_dumps_every_thread_and_the_server_keeps_serving(rec_server, caller_wav):
    srv = rec_server
    srv.allow(*THREAD_DUMP)
    size = len(srv.log_path.read_text())
    srv.proc.send_signal(signal.SIGUSR1)
    dump = poll(lambda: srv.log_path.read_text()[size:], lambda t: "Current thread 0x" in t, 10)
    threads = re.findall(r"^(?:Current thread|Thread) 0x[0-9a-f]+ \(most recent call first\):$", dump, re.M)
    assert len(threads) >= 3, dump[:3000]  # main, engine, HTTP workers ...
    assert "agent/calls/scheduler.py" in dump  # the engine thread's stack is in it
    assert srv.proc.poll() is None and http_json(srv.url + "/readyz")[0] == 200

    call_id = talk_and_hang_up(srv, "teacher", caller_wav)
    (end,) = poll(lambda: log_events(srv, "call_end", call_id=call_id), bool, 10)
    assert end["reason"] == "caller_hangup" and end["frames_out"] >= TALKED_FRAMES


def test_https_with_temporary_self_signed_certificate(tmp_path, demo_dir):
    import ssl
    import urllib.request

    srv = ServerProcess(tmp_path, demo_dir.parent, {"http": {"ssl_dir": str(tmp_path / "tls")}})
    srv.url = srv.url.replace("http://", "https://")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    def health():
        try:
            with urllib.request.urlopen(srv.url + "/healthz", context=ctx, timeout=1) as r:
                return json.loads(r.read())
        except OSError:
            return None
    try:
        assert poll(health, bool, 90, step=0.3) == {"status": "ok"}
        assert (tmp_path / "tls" / "cert.pem").exists() and (tmp_path / "tls" / "key.pem").stat().st_mode & 0o077 == 0
    finally:
        srv.stop()
