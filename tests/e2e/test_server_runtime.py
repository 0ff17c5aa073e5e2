"""Server runtime: config validation, drain on SIGTERM, metrics, bound log fields, call records."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import numpy as np
import pytest

from agent.server.config import ConfigError, load_config
from tests.support import ROOT, speech_wav
from tests.support.server import ServerProcess, http_json, http_text
from tests.support.webrtc_client import WebRtcCaller


def test_shipped_configs_are_valid():
    for name in ("demo.yaml", "production.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.engine.max_calls >= 1


def test_config_errors_name_the_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("engine:\n  max_calls: 0\n  context_policy: forever\nhttp:\n  prot: 80\nsip:\n  allow_from: [nonsense]\n")
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert str(p) in msg
    assert "engine.max_calls: Input should be greater than or equal to 1" in msg
    assert "engine.context_policy: Input should be 'hangup' or 'slide'" in msg
    assert "http.prot: unknown setting" in msg
    assert "sip.allow_from" in msg
    p.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(p)
    p.write_text("engine: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML error"):
        load_config(p)


def test_secrets_from_environment_and_never_shown(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("sip:\n  registration:\n    registrar: sip:pbx.example.com\n    user: '100'\n    password: filepw\n"
                 "model:\n  hf_token: hf_file\n")
    monkeypatch.setenv("PERSONAPLEX_SIP_PASSWORD", "envpw-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_env_secret")
    cfg = load_config(p)
    assert cfg.sip.registration.password.get_secret_value() == "envpw-secret"
    assert cfg.model.hf_token.get_secret_value() == "hf_env_secret"
    dumped = repr(cfg) + cfg.model_dump_json()
    assert "envpw-secret" not in dumped and "hf_env_secret" not in dumped


def test_config_check_cli(tmp_path, capsys):
    from agent.cli import main

    assert main(["config-check", str(ROOT / "configs" / "demo.yaml")]) == 0
    (tmp_path / "x.yaml").write_text("engine: {max_calls: -1}\n")
    assert main(["config-check", str(tmp_path / "x.yaml")]) == 2
    assert "engine.max_calls" in capsys.readouterr().err


@pytest.fixture(scope="module")
def caller_wav(tmp_path_factory):
    import shutil

    d = tmp_path_factory.mktemp("wav")
    if shutil.which("espeak-ng") and shutil.which("sox"):
        return str(speech_wav(d / "caller.wav", "Hello, I am calling about my pickup schedule.", 48000))
    import sphn
    t = np.arange(48000 * 3) / 48000
    sphn.write_wav(str(d / "caller.wav"), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 48000)
    return str(d / "caller.wav")


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_drain_keeps_calls_refuses_new_then_exits(tmp_path, demo_dir, caller_wav):
    srv = ServerProcess(tmp_path, demo_dir.parent, {"engine": {"max_calls": 2}, "drain_timeout_s": 20,
                                                      "recording": {"enabled": True, "dir": str(tmp_path / "rec")}})
    srv.wait_ready()

    async def scenario():
        a = WebRtcCaller(srv.url, "citysan", caller_wav)
        assert await a.call() == 200
        await asyncio.sleep(1.5)
        srv.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.8)
        # new calls are refused while draining, readiness says so
        b = WebRtcCaller(srv.url, "citysan", caller_wav)
        assert await b.call() == 503 and b.body["error"] == "draining"
        status, ready = await asyncio.get_running_loop().run_in_executor(None, http_json, srv.url + "/readyz")
        assert status == 503 and ready["draining"]
        metrics = await asyncio.get_running_loop().run_in_executor(None, http_text, srv.url + "/metrics")
        # the call in progress survives the signal
        got_before = len(a.received)
        deadline = time.monotonic() + 6  # 0.8 s of audio; bounded wait, not a fixed sleep (loaded CI)
        while len(a.received) <= got_before + 40 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(a.received) > got_before + 40
        assert a.kinds().count("ended") == 0
        await a.hangup()
        return metrics

    metrics = run(scenario())
    assert srv.proc.wait(20) == 0  # the last call ended: drain completes, exit 0
    srv.stop()
    lines = srv.lines()
    end = next(ln for ln in lines if ln.get("event") == "call_end")
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
    # the call record: stereo wav (caller left, agent right) + transcript, written atomically
    deadline = time.monotonic() + 5
    while not list((tmp_path / "rec").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    (meta_path,) = list((tmp_path / "rec").glob("*.json"))
    meta = json.loads(meta_path.read_text())
    assert meta["call_id"] == end["call_id"] and meta["channels"] == {"left": "caller", "right": "agent"}
    import sphn

    pcm, sr = sphn.read(str(meta_path.with_suffix(".wav")))
    assert sr == 24000 and pcm.shape[0] == 2 and np.abs(pcm[0]).max() > 0.01 and np.abs(pcm[1]).max() > 0.01
    assert not list((tmp_path / "rec").glob("*.tmp"))


def test_drain_timeout_hangs_up_politely_and_second_signal_is_immediate(tmp_path, demo_dir, caller_wav):
    srv = ServerProcess(tmp_path, demo_dir.parent, {"drain_timeout_s": 1.0})
    srv.wait_ready()

    async def scenario():
        a = WebRtcCaller(srv.url, "teacher", caller_wav)
        assert await a.call() == 200
        await asyncio.sleep(1.0)
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "ended" not in a.kinds() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        ended = [e for e in a.events if e.get("type") == "ended"]
        await a.close()
        return ended

    ended = run(scenario())
    assert ended and ended[0]["reason"] == "shutdown"  # told, not just cut off
    assert srv.proc.wait(15) == 0
    srv.stop()

    (tmp_path / "two").mkdir()
    srv2 = ServerProcess(tmp_path / "two", demo_dir.parent)
    srv2.wait_ready()

    async def hold():
        a = WebRtcCaller(srv2.url, "teacher", caller_wav)
        assert await a.call() == 200
        await asyncio.sleep(0.5)
        srv2.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        srv2.proc.send_signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, srv2.proc.wait, 10)
        await a.close()
        return code, time.monotonic() - t0

    code, dt = run(hold())
    assert code != 0 and dt < 3  # the second signal does not wait for the drain (30 s by default)
    srv2.stop(expect_exit=code)


def test_unknown_persona_and_bad_offer(tmp_path, demo_dir):
    srv = ServerProcess(tmp_path, demo_dir.parent, {"personas": {"unknown_numbers": "refuse"}})
    srv.wait_ready()
    try:
        async def scenario():
            a = WebRtcCaller(srv.url, "nobody-here")
            assert await a.call() == 404 and a.body["error"] == "not_found"
            import aiohttp

            async with aiohttp.ClientSession() as http:
                async with http.post(srv.url + "/api/call", data=b"not json") as r:
                    assert r.status == 400
                async with http.post(srv.url + "/api/call", json={"sdp": "v=0\r\n", "type": "offer"}) as r:
                    assert r.status == 400
        run(scenario())
        status, body = http_json(srv.url + "/readyz")
        assert status == 200 and body["capacity_left"] == body["max_calls"]
        assert http_json(srv.url + "/healthz") == (200, {"status": "ok"})
        assert 'personaplex_calls_total{endpoint="webrtc",outcome="refused_not_found"} 1.0' in http_text(srv.url + "/metrics")
    finally:
        srv.stop()


def test_broken_persona_edit_is_reported_and_last_good_serves(tmp_path, demo_dir):
    srv = ServerProcess(tmp_path, demo_dir.parent, {"personas": {"reload_interval_s": 0.2}})
    srv.wait_ready()
    try:
        p = tmp_path / "personas" / "citysan.yaml"
        p.write_text(p.read_text().replace("voice: NATF2", "voice: NOPE"))
        deadline = time.monotonic() + 10
        body = {}
        while time.monotonic() < deadline:
            body = http_json(srv.url + "/api/personas")[1]
            if body["problems"]:
                break
            time.sleep(0.2)
        assert any("unknown voice 'NOPE'" in pr for pr in body["problems"])
        assert any(pp["id"] == "citysan" for pp in body["personas"])  # last good version still serves
        assert "personaplex_persona_reload_errors_total 1.0" in http_text(srv.url + "/metrics")
    finally:
        srv.stop()


def test_https_with_temporary_self_signed_certificate(tmp_path, demo_dir):
    import ssl
    import urllib.request

    srv = ServerProcess(tmp_path, demo_dir.parent, {"http": {"ssl_dir": str(tmp_path / "tls")}})
    srv.url = srv.url.replace("http://", "https://")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + 90
    body = None
    while time.monotonic() < deadline and body is None:
        try:
            with urllib.request.urlopen(srv.url + "/healthz", context=ctx, timeout=1) as r:
                body = json.loads(r.read())
        except OSError:
            time.sleep(0.3)
    try:
        assert body == {"status": "ok"}
        assert (tmp_path / "tls" / "cert.pem").exists() and (tmp_path / "tls" / "key.pem").stat().st_mode & 0o077 == 0
    finally:
        srv.stop()
