"""Carrier sockets fail closed: Telnyx streams prove their stream token, Twilio streams the
per-call grant our voice webhook gave their call (and the account), sockets that never start are
closed, and a server configured without the secrets these need does not start.

Each of these was open before the security review's fixes: /telnyx/media admitted any `start`,
a captured Twilio stream signature opened any number of streams, and a silent socket stayed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml

from tests.support import ROOT
from tests.support.carriers import TwilioCaller, twilio_stream_parameters
from tests.support.server import ServerProcess, metric, no_calls, server_env

TWILIO_TOKEN = "twilio-auth-token-for-the-auth-tests"
ACCOUNT = "AC" + "7" * 32
CITYSAN = "+14155550100"


@pytest.fixture(scope="module")
def srv(tmp_path_factory, demo_dir):
    tmp = tmp_path_factory.mktemp("carrier-auth")
    s = ServerProcess(tmp, demo_dir.parent, {
        "engine": {"max_calls": 2},
        "twilio": {"enabled": True, "account_sid": ACCOUNT},
        "telnyx": {"enabled": True},
    }, env={"TWILIO_AUTH_TOKEN": TWILIO_TOKEN})
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def refused(srv, endpoint: str) -> float:
    return metric(srv, f'personaplex_calls_total{{endpoint="{endpoint}",outcome="refused_unauthorized"}}')


# ---- Telnyx ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["none", "wrong_header", "wrong_connected"])
def test_telnyx_stream_without_the_right_token_is_refused_before_start(srv, how):
    before = refused(srv, "telnyx")
    kw = {"none": {"auth_token": None}, "wrong_header": {"auth_token": None, "headers": {"x-telnyx-streaming-auth-token": "guess"}},
          "wrong_connected": {}}[how]
    caller = srv.telnyx_caller(dialled=CITYSAN, **kw)
    if how == "wrong_connected":  # the right header is not there: only the connected frame's field, wrong
        caller.headers.pop("x-telnyx-streaming-auth-token", None)
        caller.auth_token = "guess-" + "x" * 20
    run(caller.run(1.5))
    assert caller.close_code == 1008 and caller.closed_by_server
    assert caller.agent_seconds == 0  # never admitted: no agent audio
    assert refused(srv, "telnyx") == before + 1
    assert no_calls(srv)


@pytest.mark.parametrize("where", ["header", "connected"])
def test_telnyx_stream_with_the_right_token_is_answered(srv, where):
    caller = srv.telnyx_caller(dialled=CITYSAN)
    if where == "connected":  # Telnyx sends it both ways; either one suffices
        caller.headers.pop("x-telnyx-streaming-auth-token")
    run(caller.run(2.0))
    assert caller.close_code != 1008 and caller.agent_seconds > 1.0 and caller.protocol_errors == []
    assert no_calls(srv)


@pytest.mark.parametrize("path", ["/telnyx/media", "/twilio/media"])
def test_a_socket_that_never_starts_is_closed(srv, path):
    async def silent() -> tuple[int | None, float]:
        headers = {"x-telnyx-streaming-auth-token": srv.telnyx_token}
        if path == "/twilio/media":
            from telephony.streams.twilio import SIGNATURE_HEADER, twilio_signature

            headers = {SIGNATURE_HEADER: twilio_signature(TWILIO_TOKEN, srv.ws_url + path, {})}
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(srv.ws_url + path, headers=headers) as ws:
                await ws.send_str(json.dumps({"event": "connected", "version": "1.0.0"}))
                async with asyncio.timeout(15):
                    while (await ws.receive()).type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                        pass
                return ws.close_code, time.monotonic() - t0
    code, took = run(silent())
    assert code == 1008 and 4.5 <= took < 9


# ---- Twilio ---------------------------------------------------------------------------------------

def webhook_stream(srv, call_sid: str) -> dict[str, str]:
    """The <Parameter>s our voice webhook answers a call with (signed by Twilio, as Twilio would)."""
    return run(twilio_stream_parameters(srv.url, TWILIO_TOKEN, dialled=CITYSAN, call_sid=call_sid,
                                        account_sid=ACCOUNT))


def twilio(srv, call_sid: str, parameters: dict[str, str], account: str = ACCOUNT) -> TwilioCaller:
    # signed upgrade (the constant URL's signature), the given parameters, no grant of its own
    return TwilioCaller(srv.ws_url + "/twilio/media", call_sid=call_sid, account_sid=account,
                        parameters=parameters, auth_token=TWILIO_TOKEN, grant=False)


def test_twilio_stream_needs_its_calls_grant_once(srv):
    before = refused(srv, "twilio")
    parameters = webhook_stream(srv, "CA" + "1" * 32)
    assert set(parameters) == {"to", "from", "personaplex_grant"}
    first = twilio(srv, "CA" + "1" * 32, parameters)
    run(first.run(2.0))
    assert first.close_code != 1008 and first.agent_seconds > 1.0
    # the captured signature and grant, replayed: refused (one grant, one stream)
    replay = twilio(srv, "CA" + "1" * 32, parameters)
    run(replay.run(1.0))
    assert replay.close_code == 1008 and replay.agent_seconds == 0
    # the grant moved to another call, or the parameters changed (another persona), or none at all
    for sid, params in (("CA" + "2" * 32, parameters), ("CA" + "3" * 32, dict(parameters, to="+14155550101")),
                        ("CA" + "4" * 32, {"to": CITYSAN})):
        if sid.startswith("CA3"):
            params = dict(webhook_stream(srv, sid), to="+14155550101")
        c = twilio(srv, sid, params)
        run(c.run(1.0))
        assert c.close_code == 1008 and c.agent_seconds == 0, sid
    assert refused(srv, "twilio") == before + 4
    # variables never see the grant
    ctx = [ln for ln in srv.lines() if ln.get("event") == "call_context"]
    assert ctx and all("personaplex_grant" not in ln.get("variables", []) for ln in ctx)
    assert no_calls(srv)


def test_twilio_stream_of_another_account_is_refused(srv):
    sid = "CA" + "5" * 32
    c = twilio(srv, sid, webhook_stream(srv, sid), account="AC" + "8" * 32)
    run(c.run(1.0))
    assert c.close_code == 1008 and c.agent_seconds == 0


# ---- fail closed at start -------------------------------------------------------------------------

def start_refused(tmp_path, overrides: dict, env: dict[str, str]) -> tuple[int, str]:
    """`serve` with a config that lacks a secret: exit status and what it said (it stops
    before loading any model, so this is quick)."""
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["sip"]["enabled"] = False
    cfg["http"]["port"] = 0
    cfg["ops"] = {"port": 0}
    for k, v in overrides.items():
        cfg.setdefault(k, {}).update(v)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    clean = {k: v for k, v in server_env().items()
             if k not in ("TWILIO_AUTH_TOKEN", "TELNYX_STREAM_TOKEN", "OPS_TOKEN", "CALL_SECRET")}
    p = subprocess.run([sys.executable, "-m", "server", "serve", "--config", str(path)], capture_output=True,
                       text=True, timeout=60, env={**clean, **env}, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.parametrize("overrides,env,says", [
    ({"twilio": {"enabled": True}}, {}, "$TWILIO_AUTH_TOKEN"),
    ({"telnyx": {"enabled": True}}, {}, "telnyx.stream_auth_token_env"),
    ({"telnyx": {"enabled": True, "stream_auth_token_env": "TELNYX_STREAM_TOKEN"}}, {}, "$TELNYX_STREAM_TOKEN"),
    ({"telnyx": {"enabled": True, "stream_auth_token_env": "TELNYX_STREAM_TOKEN"}},
     {"TELNYX_STREAM_TOKEN": "short"}, "too short"),
], ids=["twilio-no-token", "telnyx-no-setting", "telnyx-unset", "telnyx-weak"])
def test_a_carrier_without_its_secret_stops_the_server_at_start(tmp_path, overrides, env, says):
    rc, out = start_refused(tmp_path, overrides, env)
    assert rc == 2 and says in out and "config_refused" in out, out[-2000:]


def test_loopback_test_switches_start_with_a_warning(tmp_path):
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["twilio"] = {"enabled": True, "allow_unsigned": True}
    cfg["telnyx"] = {"enabled": True, "allow_unauthenticated": True}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = subprocess.run([sys.executable, "-m", "server", "config-check", str(path)], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert p.returncode == 0 and "twilio.allow_unsigned is on" in p.stdout and "telnyx.allow_unauthenticated" in p.stdout
    strict = subprocess.run([sys.executable, "-m", "server", "config-check", "--strict", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert strict.returncode == 1
