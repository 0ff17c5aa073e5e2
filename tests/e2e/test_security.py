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

from telephony.security.tokens import CALLER_MESSAGES, mint
from tests.support import ROOT, poll, require
from tests.support.server import ServerProcess, http_json, server_env
from tests.support.webrtc_client import WebRtcCaller

SECRET = "test-token-secret-0123456789abcdef"
OPS_TOKEN = "ops-token-abc-0123456789"


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
    try:
        srv.wait_ready()
        srv.rec = tmp / "rec"
        yield srv
    finally:
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
    for path in ("/metrics", "/api/calls", "/api/calls/any/events"):
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
    assert get(secure.ops_url + "/api/calls/any/events")[0] == 401  # a call's live events too
    assert get(secure.ops_url + "/api/calls/any/events", {"Authorization": f"Bearer {OPS_TOKEN}"})[0] == 404
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
    # what the page shows the person calling comes from the server, one sentence per reason
    assert c.body["message"] == CALLER_MESSAGES[reason] and c.body["detail"], c.body


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
    out = subprocess.run([sys.executable, "-m", "server", "token", "mint", "--persona", "citysan", "--ttl", "30",
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
    try:
        srv.wait_ready()
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
            # junk counts in a bucket of its own: 5 bad offers a minute are answered 400, the 6th 429...
            junk = []
            async with aiohttp.ClientSession() as http:
                for _ in range(6):
                    async with http.post(srv.url + "/api/call", json={"sdp": "x", "type": "offer"}) as r:
                        junk.append(r.status)
            # ...and locks nobody out: call attempts a minute are 4 so far, the 5th is let through,
            # the 6th is over, with Retry-After
            fifth = WebRtcCaller(srv.url, "citysan")
            fifth_status = await fifth.call()
            await fifth.hangup()
            sixth = WebRtcCaller(srv.url, "citysan")
            return junk, fifth_status, await sixth.call(), sixth.body.get("retry_after")
        junk, fifth, status, retry = run(scenario())
        assert junk == [400] * 5 + [429]
        assert fifth == 200
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
    try:
        srv.wait_ready()
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


def config_check(path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PERSONAPLEX_", "TWILIO_", "TELNYX_"))}
    return subprocess.run([sys.executable, "-m", "server", "config-check", *flags, str(path)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**clean, **(env or {})})


def test_config_check_reports_errors_and_warnings(tmp_path):
    cfg = tmp_path / "open.yaml"
    cfg.write_text("http: {host: 0.0.0.0}\nops: {host: 0.0.0.0}\nwebrtc: {playground: true}\n"
                   "webhooks: {call_end: {url: 'http://crm.example.com/hooks'}}\n")
    out = config_check(cfg)
    assert out.returncode == 1, out.stdout  # errors: what the server refuses to start with
    errors = [ln for ln in out.stdout.splitlines() if ln.startswith("error:")]
    warnings = [ln for ln in out.stdout.splitlines() if ln.startswith("warning:")]
    assert any("ops listener" in e and "ops.token_env" in e for e in errors)
    assert any("playground" in e and "PERSONAPLEX_PLAYGROUND_TOKEN" in e for e in errors)
    assert any("without TLS" in w for w in warnings) and any("tokens" in w for w in warnings)
    assert any("webhooks.call_end.url" in e and "$PERSONAPLEX_WEBHOOK_SECRET" in e for e in errors)
    assert any("webhooks.call_end.url is plain http://" in w for w in warnings)
    # warnings alone: ok, unless --strict
    warn_only = tmp_path / "warn.yaml"
    warn_only.write_text("http: {host: 0.0.0.0}\n")
    assert config_check(warn_only).returncode == 0 and config_check(warn_only, "--strict").returncode == 1


# what the README's security section tells an operator to put in the environment
DOCUMENTED_ENV = {"PERSONAPLEX_TOKEN_SECRET": "x" * 48, "PERSONAPLEX_OPS_TOKEN": "o" * 32}


def test_production_config_passes_strict_with_the_documented_environment():
    prod = ROOT / "configs" / "production.yaml"
    safe = config_check(prod, "--strict", env=DOCUMENTED_ENV)
    assert safe.returncode == 0 and "warning" not in safe.stdout and "error" not in safe.stdout, safe.stdout
    # and fails closed without it, saying what to set
    bare = config_check(prod)
    assert bare.returncode == 1 and "$PERSONAPLEX_TOKEN_SECRET" in bare.stdout


@pytest.mark.parametrize("overrides,env,says", [
    ({"ops": {"token_env": "OPS_TOKEN"}}, {}, "$OPS_TOKEN"),
    ({"ops": {"host": "0.0.0.0"}}, {}, "off loopback"),
    ({"ops": {"token_env": "OPS_TOKEN"}}, {"OPS_TOKEN": "short"}, "too short"),
    ({"webrtc": {"tokens": {"secret_env": "CALL_SECRET", "required": True}}}, {"CALL_SECRET": "s" * 31}, "32"),
    ({"webrtc": {"tokens": {"secret_env": "CALL_SECRET", "required": True}}}, {}, "$CALL_SECRET"),
    ({"context": {"lookup_url": "http://crm.example.com/x", "lookup_token_env": "CRM"}}, {}, "in clear"),
    ({"webhooks": {"call_end": {"url": "https://crm.example.com/hooks"}}}, {}, "$PERSONAPLEX_WEBHOOK_SECRET"),
    ({"webhooks": {"call_start": {"url": "https://crm.example.com/hooks"}, "secret_env": "HOOK_SECRET"}},
     {"HOOK_SECRET": "h" * 31}, "32 random bytes"),
], ids=["ops-token-unset", "ops-off-loopback", "ops-token-weak", "short-secret", "secret-unset", "crm-plain-http",
        "webhook-secret-unset", "webhook-secret-weak"])
def test_a_missing_or_weak_secret_stops_the_server_at_start(tmp_path, overrides, env, says):
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["sip"]["enabled"] = False
    cfg["http"]["port"] = 0
    for k, v in overrides.items():
        cfg.setdefault(k, {}).update(v)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    clean = {k: v for k, v in server_env().items()
             if k not in ("OPS_TOKEN", "CALL_SECRET", "CRM", "HOOK_SECRET", "PERSONAPLEX_WEBHOOK_SECRET")}
    p = subprocess.run([sys.executable, "-m", "server", "serve", "--config", str(path)], capture_output=True,
                       text=True, timeout=60, env={**clean, **env}, cwd=ROOT)
    assert p.returncode == 2 and says in p.stdout + p.stderr, (p.stdout + p.stderr)[-2000:]
    assert config_check(path, env=env).returncode == 1


def test_invalid_security_settings_are_config_errors(tmp_path):
    for text, says in (("http: {trusted_proxies: [10.0.0.300]}", "not an IP address"),
                       ("sip: {registration: {registrar: 'sip:pbx', user: u}}", "realm"),
                       ("sip: {registration: {registrar: 'sip:pbx', user: u, realm: '*'}}", "realm"),
                       ("webrtc: {tokens: {replay_store: 'http://x'}}", "redis://")):
        path = tmp_path / "bad.yaml"
        path.write_text(text + "\n")
        out = config_check(path)
        assert out.returncode == 2 and says in out.stdout + out.stderr, (text, out.stdout + out.stderr)


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
            page2.wait_for_function("['connected', 'answering', 'live'].includes(window.__call.state)", timeout=30000)
            page2.wait_for_function("window.__call.texts > 2", timeout=40000)
            page2.click("#hangup")
        finally:
            b.close()


# ---- the review's medium and low holes, end to end -------------------------------------------------

@pytest.fixture(scope="module")
def proxied(tmp_path_factory, demo_dir):
    """Behind a trusted proxy on this host (127.0.0.1 is our HAProxy), one call per client, the
    playground on, and a phone-only persona."""
    tmp = tmp_path_factory.mktemp("proxied")
    (tmp / "personas").mkdir()
    import shutil

    for f in (ROOT / "personas").glob("*.yaml"):
        shutil.copy(f, tmp / "personas")
    (tmp / "personas" / "phone-only.yaml").write_text(
        'kind: casual\nnumbers: ["2999"]\ntopic: the weather\nvoice: VARF0\nbrowser: false\n')
    srv = ServerProcess(tmp, demo_dir.parent, {
        "engine": {"max_calls": 4},
        "http": {"trusted_proxies": ["127.0.0.1/32"]},
        "webrtc": {"playground": True, "client_context": True,
                   "limits": {"enabled": True, "concurrent_calls": 1, "attempts_per_minute": 50}},
        "recording": {"enabled": True, "dir": str(tmp / "rec")},
    })
    try:
        srv.wait_ready()
        srv.rec = tmp / "rec"
        yield srv
    finally:
        srv.stop()


def test_a_client_behind_haproxy_cannot_spoof_or_rotate_its_address(proxied):
    async def scenario():
        # what the client wrote, then what HAProxy appended (the real peer)
        first = WebRtcCaller(proxied.url, "citysan", headers={"X-Forwarded-For": "9.9.9.1, 203.0.113.9"})
        assert await first.call() == 200
        rotated = WebRtcCaller(proxied.url, "citysan", headers={"X-Forwarded-For": "9.9.9.2, 203.0.113.9"})
        junk = WebRtcCaller(proxied.url, "citysan", headers={"X-Forwarded-For": "203.0.113.9, 127.0.0.1, <x>"})
        other = WebRtcCaller(proxied.url, "citysan", headers={"X-Forwarded-For": "203.0.113.10"})
        statuses = [await rotated.call(), await other.call()]
        await other.hangup()
        # junk nearest to the proxy: the client is the proxy's own address, a client of its own
        statuses.append(await junk.call())
        await junk.hangup()
        await first.hangup()
        return statuses
    assert run(scenario()) == [429, 200, 200]


def test_built_in_numbers_cannot_be_set_by_carried_context(proxied):
    async def call():
        c = WebRtcCaller(proxied.url, "citysan", extra={"context": {"caller_number": "+14155550999",
                                                                    "dialled_number": "victim",
                                                                    "customer_name": "Ana"}},
                         headers={"X-Forwarded-For": "203.0.113.20"})
        assert await c.call() == 200, c.body
        await asyncio.sleep(0.5)
        await c.hangup()
        return c.body["call_id"]
    call_id = run(call())
    rec = json.loads(poll(lambda: list(proxied.rec.glob(f"*{call_id}.json")), bool, 10)[0].read_text())
    assert rec["variables"]["customer_name"] == "Ana"  # trusted context still arrives...
    assert rec["variables"].get("caller_number", "") != "+14155550999"  # ...but never over the built-ins
    assert rec["variables"].get("dialled_number") != "victim"


def test_a_proxied_or_cross_site_playground_request_is_not_local(proxied):
    # straight from this host: allowed
    assert get(proxied.url + "/api/playground")[0] == 200
    # from this host's reverse proxy we do not trust... here 127.0.0.1 is trusted, so the
    # forwarded client's own address decides: a stranger
    assert get(proxied.url + "/api/playground", {"X-Forwarded-For": "203.0.113.9"})[0] in (401, 403)
    # X-Real-IP is not what our proxy sets: from a trusted peer without X-Forwarded-For, the peer
    # is the client (the untrusted-proxy case is the next test)
    assert get(proxied.url + "/api/playground", {"X-Real-IP": "203.0.113.9"})[0] == 200
    import urllib.request

    def post(headers: dict) -> int:
        req = urllib.request.Request(proxied.url + "/api/playground/yaml", method="POST", headers=headers,
                                     data=json.dumps({"persona": {"kind": "casual", "topic": "the weather", "voice": "VARF0"}, "id": "x"}).encode())
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
    ok = {"Content-Type": "application/json"}
    assert post(ok) == 200
    assert post({**ok, "Origin": "https://evil.example"}) == 403  # CSRF from another site
    assert post({**ok, "Origin": proxied.url}) == 200
    assert post({"Content-Type": "text/plain"}) == 415  # a plain form cannot send JSON


def test_playground_behind_an_untrusted_local_proxy_needs_the_token(tmp_path, demo_dir):
    srv = ServerProcess(tmp_path, demo_dir.parent, {"webrtc": {"playground": True}})
    try:
        srv.wait_ready()
        assert get(srv.url + "/api/playground")[0] == 200
        for h in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}, {"X-Real-IP": "1.2.3.4"}):
            assert get(srv.url + "/api/playground", h)[0] in (401, 403), h
    finally:
        srv.stop()


def test_phone_only_personas_refuse_browser_calls(proxied):
    async def scenario():
        phone = WebRtcCaller(proxied.url, "2999", headers={"X-Forwarded-For": "203.0.113.30"})
        ok = WebRtcCaller(proxied.url, "citysan", headers={"X-Forwarded-For": "203.0.113.30"})
        statuses = (await phone.call(), await ok.call())
        await ok.hangup()
        return statuses, phone.body
    (phone, ok), body = run(scenario())
    assert phone == 403 and body["error"] == "forbidden" and ok == 200


def test_offers_with_extra_sections_are_refused_without_library_text(proxied):
    async def offer(sdp: str) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as http:
            async with http.post(proxied.url + "/api/call", json={"sdp": sdp, "type": "offer", "persona": "citysan"},
                                 headers={"X-Forwarded-For": "203.0.113.40"}) as r:
                return r.status, await r.json()
    from aiortc import RTCPeerConnection

    async def real_offer(video: bool) -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver("audio")
        pc.addTransceiver("audio")
        if video:
            pc.addTransceiver("video")
        pc.createDataChannel("events")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp
    for video in (False, True):
        status, body = run(offer(run(real_offer(video))))
        assert status == 400 and "audio" in body["reason"], body
    # an offer aiortc cannot negotiate: our words, not the library's
    status, body = run(offer("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"))
    assert status == 400 and body["reason"].startswith("cannot negotiate this offer") and "Error" not in body["reason"]


def test_call_records_and_the_tls_key_are_owner_only_from_the_start(secure, tmp_path):
    # records of the calls placed above (the server's umask is 077: no window where they are not)
    files = poll(lambda: list(secure.rec.iterdir()), bool, 10)
    assert files and all(f.stat().st_mode & 0o077 == 0 for f in files), [oct(f.stat().st_mode) for f in files]
    assert secure.rec.stat().st_mode & 0o077 == 0
    # the self-signed key is created 0600 even under a permissive umask
    from server.tls import self_signed

    old = os.umask(0o022)
    try:
        _, key = self_signed(tmp_path / "tls")
    finally:
        os.umask(old)
    assert key.stat().st_mode & 0o777 == 0o600
