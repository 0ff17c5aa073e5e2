"""Production security with production-style settings: ops data only on the ops listener,
signed single-use call tokens, per-client limits."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp
import pytest

from agent.security.tokens import mint
from tests.support import ROOT, poll, require
from tests.support.server import ServerProcess, http_json
from tests.support.webrtc_client import WebRtcCaller

SECRET = "test-token-secret-0123456789abcdef"
OPS_TOKEN = "ops-token-abc"


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def get(url: str, headers: dict | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def secure(tmp_path_factory, demo_dir):
    """Production-style: tokens required, per-client limits, ops behind a token."""
    tmp = tmp_path_factory.mktemp("secure")
    srv = ServerProcess(tmp, demo_dir.parent, {
        "engine": {"max_calls": 4},
        "webrtc": {"tokens": {"secret_env": "CALL_TOKEN_SECRET", "required": True, "max_ttl_s": 120},
                   "limits": {"enabled": True, "concurrent_calls": 2, "attempts_per_minute": 60},
                   "playground": False},
        "ops": {"token_env": "OPS_TOKEN"},
        "recording": {"enabled": True, "dir": str(tmp / "rec")},
    }, env={"CALL_TOKEN_SECRET": SECRET, "OPS_TOKEN": OPS_TOKEN})
    srv.wait_ready()
    srv.rec = tmp / "rec"
    yield srv
    srv.stop()


def offer_call(srv, persona: str | None, token: str | None = None, headers: dict | None = None,
               context: dict | None = None) -> WebRtcCaller:
    extra = {}
    if token is not None:
        extra["token"] = token
    if context is not None:
        extra["context"] = context
    c = WebRtcCaller(srv.url, persona or "", extra=extra, headers=headers)
    run(c.call())
    return c


def test_ops_data_is_not_readable_from_the_public_port(secure):
    for path in ("/metrics", "/api/calls"):
        assert get(secure.url + path)[0] == 404
    status, body = get(secure.url + "/readyz")
    assert status == 200 and json.loads(body) == {"ready": True, "capacity_left": 4}
    personas = json.loads(get(secure.url + "/api/personas")[1])
    assert set(personas) == {"personas"}  # no problems, no file paths
    for p in personas["personas"]:
        assert set(p) <= {"id", "kind", "company", "agent_name", "description"}
    # the ops listener has it all, with the token only
    assert get(secure.ops_url + "/metrics")[0] == 401
    assert get(secure.ops_url + "/metrics", {"Authorization": "Bearer nope"})[0] == 401
    status, text = get(secure.ops_url + "/metrics", {"Authorization": f"Bearer {OPS_TOKEN}"})
    assert status == 200 and "personaplex_slots_total" in text
    status, text = get(secure.ops_url + "/api/personas", {"Authorization": f"Bearer {OPS_TOKEN}"})
    assert status == 200 and "numbers" in text and "problems" in text


@pytest.mark.parametrize("case, make, reason", [
    ("missing", lambda: None, "missing"),
    ("forged", lambda: mint("not-the-secret", "citysan", 60), "bad_signature"),
    ("expired", lambda: mint(SECRET, "citysan", 60, now=time.time() - 3600), "expired"),
    ("too long", lambda: mint(SECRET, "citysan", 3600), "ttl_too_long"),
    ("other line", lambda: mint(SECRET, "teacher", 60), "persona_not_allowed"),
    ("garbage", lambda: "not.a.jwt", "invalid"),
])
def test_a_call_without_a_valid_token_is_refused_with_the_reason(secure, case, make, reason):
    c = offer_call(secure, "citysan", make())
    assert c.status == 401 and c.body["reason"] == reason, (case, c.body)


def test_a_valid_token_calls_once_and_its_context_reaches_the_prompt(secure, tmp_path):
    token = mint(SECRET, "+1 (415) 555-0100", 60, {"customer_name": "Omar Torres"})

    async def call():
        c = WebRtcCaller(secure.url, "", extra={"token": token})
        assert await c.call() == 200, c.body
        await asyncio.sleep(1.0)
        await c.hangup()
        return c.body["call_id"]
    call_id = run(call())
    rec = json.loads(poll(lambda: list(secure.rec.glob(f"*{call_id}.json")), bool, 10)[0].read_text())
    assert rec["persona"] == "citysan" and rec["variables"]["customer_name"] == "Omar Torres"
    again = offer_call(secure, None, token)
    assert again.status == 401 and again.body["reason"] == "reused"
    # the command line mints the same kind of token
    out = subprocess.run([sys.executable, "-m", "agent", "token", "mint", "--persona", "citysan", "--ttl", "30",
                          "--var", "customer_name=Ana", "--secret-env", "CALL_TOKEN_SECRET"],
                         capture_output=True, text=True, env=dict(os.environ, CALL_TOKEN_SECRET=SECRET), timeout=60)
    assert out.returncode == 0, out.stderr
    import jwt

    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["persona"] == "citysan" and claims["context"] == {"customer_name": "Ana"}
    assert claims["exp"] - claims["iat"] == 30


def test_per_client_limits(tmp_path, demo_dir):
    srv = ServerProcess(tmp_path, demo_dir.parent, {
        "engine": {"max_calls": 4},
        "http": {"trusted_proxies": []},
        "webrtc": {"limits": {"enabled": True, "concurrent_calls": 2, "attempts_per_minute": 5}},
    })
    srv.wait_ready()
    try:
        async def scenario():
            up = [WebRtcCaller(srv.url, "citysan") for _ in range(2)]
            for c in up:
                assert await c.call() == 200
            third = WebRtcCaller(srv.url, "citysan")
            assert await third.call() == 429 and third.body["error"] == "limited"
            # X-Forwarded-For from a client nobody trusts changes nothing
            spoof = WebRtcCaller(srv.url, "citysan", headers={"X-Forwarded-For": "203.0.113.9"})
            assert await spoof.call() == 429
            for c in up:
                await c.hangup()
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: poll(lambda: http_json(srv.ops_url + "/api/calls")[1]["calls"], lambda c: not c, 10))
            # attempts a minute: 4 so far; the 5th is still let through (and is a bad offer), the
            # 6th is over, with Retry-After
            answers = []
            async with aiohttp.ClientSession() as http:
                for _ in range(2):
                    async with http.post(srv.url + "/api/call", json={"sdp": "x", "type": "offer"}) as r:
                        answers.append((r.status, r.headers.get("Retry-After")))
            return answers
        (fifth, _), (status, retry) = run(scenario())
        assert fifth == 400
        assert status == 429 and retry is not None and 1 <= int(retry) <= 60

        async def big():
            async with aiohttp.ClientSession() as http:
                async with http.post(srv.url + "/api/call", data=b"{" + b" " * (70 * 1024) + b"}",
                                     headers={"Content-Type": "application/json"}) as r:
                    return r.status
        assert run(big()) in (413, 429)  # the limiter may answer first: either way nothing is read
    finally:
        srv.stop()


def test_oversized_offers_and_a_flooding_page_are_bounded(tmp_path, demo_dir):
    srv = ServerProcess(tmp_path, demo_dir.parent, {
        "engine": {"max_calls": 2},
        "webrtc": {"limits": {"enabled": True, "attempts_per_minute": 50, "channel_max_per_s": 20}}})
    srv.wait_ready()
    try:
        async def big():
            async with aiohttp.ClientSession() as http:
                async with http.post(srv.url + "/api/call", data=b'{"sdp": "' + b"a" * (70 * 1024) + b'"}',
                                     headers={"Content-Type": "application/json"}) as r:
                    return r.status
        assert run(big()) == 413

        async def flood():
            c = WebRtcCaller(srv.url, "citysan")
            assert await c.call() == 200
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: poll(lambda: c.channel.readyState, lambda s: s == "open", 10))
            for _ in range(200):
                c.channel.send(json.dumps({"type": "dtmf", "digit": "5"}))  # far over 20 a second
            c.channel.send("x" * 10_000)
            await asyncio.sleep(1.0)
            alive = http_json(srv.ops_url + "/api/calls")[1]["calls"]
            await c.hangup()
            return alive
        assert len(run(flood())) == 1  # the call was not hurt
        metrics = get(srv.ops_url + "/metrics")[1]
        dropped_fast = [ln for ln in metrics.splitlines() if ln.startswith('personaplex_datachannel_dropped_total{reason="too_fast"}')]
        dropped_big = [ln for ln in metrics.splitlines() if ln.startswith('personaplex_datachannel_dropped_total{reason="too_large"}')]
        assert dropped_fast and float(dropped_fast[0].split()[-1]) >= 150
        assert dropped_big and float(dropped_big[0].split()[-1]) == 1
        dtmf = [ln for ln in metrics.splitlines() if ln.startswith('personaplex_dtmf_total{endpoint="webrtc"}')]
        assert dtmf and float(dtmf[0].split()[-1]) <= 25  # only what the rate allows reached call control
    finally:
        srv.stop()


def test_config_check_warns_on_unsafe_settings(tmp_path):
    cfg = tmp_path / "open.yaml"
    cfg.write_text("http: {host: 0.0.0.0}\nops: {host: 0.0.0.0}\nwebrtc: {playground: true}\n")
    out = subprocess.run([sys.executable, "-m", "agent", "config-check", str(cfg)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0
    text = out.stdout
    assert "without TLS" in text and "tokens" in text and "ops listener" in text and "playground" in text
    safe = subprocess.run([sys.executable, "-m", "agent", "config-check", str(ROOT / "configs" / "production.yaml")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert safe.returncode == 0 and "warning" not in safe.stdout


def test_page_with_a_token_calls_and_one_with_an_expired_token_says_why(secure, tmp_path):
    require("chromium")
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    good = mint(SECRET, "citysan", 60)
    expired = mint(SECRET, "citysan", 60, now=time.time() - 600)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = b.new_page()
            page.goto(f"{secure.url}/#token={expired}")
            page.wait_for_selector("#persona option", state="attached")
            page.click("#call")
            page.wait_for_function("document.getElementById('status').textContent.includes('expired')")
            assert "Cannot call" in page.inner_text("#status")
            page2 = b.new_page()
            page2.goto(f"{secure.url}/#token={good}")
            page2.wait_for_selector("#persona option", state="attached")
            page2.click("#call")
            page2.wait_for_function("window.__call.state === 'connected'", timeout=30000)
            page2.wait_for_function("window.__call.texts > 2", timeout=40000)
            page2.click("#hangup")
        finally:
            b.close()
