"""Single-use credentials across a farm: every agent shares one real redis-server as its store of
used call-token ids and Twilio stream grants (`webrtc.tokens.replay_store`,
telephony/security/replay_redis.py).

A token taken on one agent is refused as "reused" on another, and a Twilio stream grant opens one
stream in the whole farm; with Redis down, token calls and Twilio streams are refused
("store_unavailable" counted, close 1008), never admitted unchecked; once Redis is back the agents
take calls again by themselves. A missing redis-server fails these tests (never skips).
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import redis
from structlog.testing import capture_logs

from telephony.security.replay import ReplayStoreUnavailable
from telephony.security.replay_redis import KEY_PREFIX, RedisReplayStore
from telephony.security.tokens import mint
from tests.support import poll
from tests.support.carriers import TwilioCaller, twilio_stream_parameters
from tests.support.redis_server import RedisServer
from tests.support.server import ServerProcess, http_json, metric, no_calls
from tests.support.webrtc_client import WebRtcCaller

SECRET = "farm-token-secret-0123456789abcdef-xyz"  # 32+ bytes
BOUND_S = 1.0  # a claim that cannot reach Redis gives up within about this long
REFUSED = 'personaplex_calls_total{endpoint="webrtc",outcome="refused_token_store_unavailable"}'
TWILIO_TOKEN = "twilio-auth-token-for-the-farm-tests"


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


@pytest.fixture
def redis_srv(tmp_path):
    srv = RedisServer(tmp_path).start()
    try:
        yield srv
    finally:
        srv.stop()


def timed_claim(store: RedisReplayStore, jti: str) -> tuple[float, BaseException | None]:
    t = time.monotonic()
    try:
        store.claim(jti, time.time() + 60)
    except ReplayStoreUnavailable as exc:
        return time.monotonic() - t, exc
    return time.monotonic() - t, None


# --- the store itself, two "agents" on one Redis --------------------------------------------


def test_two_agents_share_single_use_and_redis_forgets_at_expiry(redis_srv):
    a, b = RedisReplayStore(redis_srv.url()), RedisReplayStore(redis_srv.url())
    probe = redis.Redis.from_url(redis_srv.url(), socket_timeout=2)
    try:
        expires = time.time() + 120
        assert a.claim("jti-1", expires) is True
        assert b.claim("jti-1", expires) is False  # the other agent sees the first one's use
        assert a.claim("jti-1", expires) is False
        assert b.claim("jti-2", expires) is True and a.claim("jti-2", expires) is False
        ttl = probe.ttl(KEY_PREFIX + "jti-1")
        assert 115 <= ttl <= 121, ttl  # forgotten when the token has expired anyway
        # already past its expiry (the verifier's leeway): still remembered, for at least 1 s
        assert a.claim("jti-late", time.time() - 3) is True and b.claim("jti-late", time.time()) is False
        assert 0 < probe.ttl(KEY_PREFIX + "jti-late") <= 1
        clients = lambda: len(probe.client_list())  # noqa: E731
        assert clients() >= 3
        a.close()
        b.close()
        assert poll(clients, lambda n: n == 1, 5) == 1  # only the probe is left
    finally:
        probe.close()


def test_redis_down_refuses_within_the_bound_and_the_store_recovers_by_itself(redis_srv):
    a, b = RedisReplayStore(redis_srv.url()), RedisReplayStore(redis_srv.url())
    try:
        assert a.claim("before", time.time() + 60) and not b.claim("before", time.time() + 60)
        redis_srv.stop()
        with capture_logs() as logs:
            for store in (a, b, a):
                took, exc = timed_claim(store, "while-down")
                assert isinstance(exc, ReplayStoreUnavailable) and took < BOUND_S, (took, exc)
                assert f"127.0.0.1:{redis_srv.port}" in str(exc)
        # one warning per store when it goes down, not one per call
        assert [ln["event"] for ln in logs if ln["log_level"] == "warning"] == ["replay_store_unavailable"] * 2
        redis_srv.start()  # same port, memory empty (no persistence in this test)
        with capture_logs() as logs:
            # the very first claim of each store after the restart works: the pool reconnects
            assert a.claim("after", time.time() + 60) is True
            assert b.claim("after", time.time() + 60) is False
        assert [ln["event"] for ln in logs] == ["replay_store_available"] * 2
        # restarted while idle (pooled connections are dead, no failed claim in between)
        redis_srv.stop()
        redis_srv.start()
        assert a.claim("idle-restart", time.time() + 60) is True
        assert b.claim("idle-restart", time.time() + 60) is False
    finally:
        a.close()
        b.close()


def test_a_redis_that_does_not_answer_times_out_within_the_bound():
    """Accepts connections (the kernel's backlog) and never replies: a hung or black-holed Redis."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        store = RedisReplayStore(f"redis://127.0.0.1:{hole.getsockname()[1]}/0")
        try:
            for _ in range(3):
                took, exc = timed_claim(store, "hung")
                assert isinstance(exc, ReplayStoreUnavailable) and took < BOUND_S + 0.3, (took, exc)
                assert "Timeout" in str(exc)
        finally:
            store.close()


def test_the_password_never_appears_in_errors_or_logs(tmp_path):
    password = "pw-Sekr1t-do-not-print"
    with RedisServer(tmp_path, password=password) as srv:
        good = RedisReplayStore(srv.url())
        assert good.claim("x", time.time() + 30) is True
        wrong = RedisReplayStore(srv.url(password="another-Sekr1t"))
        none = RedisReplayStore(srv.url(password=""))
        with capture_logs() as logs:
            for store, secret in ((wrong, "another-Sekr1t"), (none, password)):
                took, exc = timed_claim(store, "x")
                assert isinstance(exc, ReplayStoreUnavailable) and "Authentication" in str(exc), exc
                assert secret not in str(exc) and password not in str(exc)
                assert secret not in repr(store.where)
        assert logs and all(password not in repr(ln) and "another-Sekr1t" not in repr(ln) for ln in logs)
        srv.stop()
        _, exc = timed_claim(good, "y")
        assert isinstance(exc, ReplayStoreUnavailable) and password not in str(exc)
        for store in (good, wrong, none):
            store.close()
    with pytest.raises(ValueError) as bad:
        RedisReplayStore(f"redis://:{password}@127.0.0.1:notaport/0")
    assert password not in str(bad.value)


# --- end to end: two real agents, one Redis -------------------------------------------------


def agent(tmp_path, name, demo_dir, store_url) -> ServerProcess:
    d = tmp_path / name
    d.mkdir()
    return ServerProcess(d, demo_dir.parent, {
        "engine": {"max_calls": 2},
        "webrtc": {"tokens": {"secret_env": "CALL_TOKEN_SECRET", "required": True, "max_ttl_s": 120,
                              "replay_store": store_url},
                   "playground": False},
        "twilio": {"enabled": True},
    }, env={"CALL_TOKEN_SECRET": SECRET, "TWILIO_AUTH_TOKEN": TWILIO_TOKEN})


def offer(srv: ServerProcess, token: str, hang_up: bool = True) -> WebRtcCaller:
    async def go():
        c = WebRtcCaller(srv.url, "", extra={"token": token})
        if await c.call() == 200 and hang_up:
            await asyncio.sleep(0.5)
            await c.hangup()
        return c
    return run(go())


def twilio_stream(srv: ServerProcess, call_sid: str, parameters: dict[str, str], seconds: float) -> TwilioCaller:
    """A Twilio stream for `call_sid` with the webhook's `parameters` (its grant), signed upgrade."""
    c = TwilioCaller(srv.ws_url + "/twilio/media", call_sid=call_sid, parameters=parameters,
                     auth_token=TWILIO_TOKEN, grant=False)
    run(c.run(seconds))
    return c


def test_a_token_calls_once_across_the_farm_and_redis_down_refuses_token_calls(tmp_path, demo_dir, redis_srv):
    agents = [agent(tmp_path, f"agent{i}", demo_dir, redis_srv.url()) for i in (1, 2)]
    try:
        for srv in agents:
            srv.wait_ready()
        one, two = agents
        token = mint(SECRET, "citysan", 60)
        first = offer(one, token)
        assert first.status == 200, first.body
        replay = offer(two, token)  # the load balancer sent the replay to the other agent
        assert replay.status == 401 and replay.body["reason"] == "reused", replay.body
        again = offer(one, token)
        assert again.status == 401 and again.body["reason"] == "reused", again.body
        # a Twilio call's grant: its stream on one agent, the captured stream replayed on the other
        sid = "CA" + "1" * 32
        grant = run(twilio_stream_parameters(one.url, TWILIO_TOKEN, call_sid=sid))
        first = twilio_stream(one, sid, grant, 1.5)
        assert first.close_code != 1008 and first.agent_seconds > 0.5, first.close_code
        replayed = twilio_stream(two, sid, grant, 1.0)
        assert replayed.close_code == 1008 and replayed.agent_seconds == 0, replayed.close_code
        assert no_calls(one) and no_calls(two)

        redis_srv.stop()
        before = [metric(srv, REFUSED) for srv in agents]
        for srv in agents:
            t = time.monotonic()
            fresh = offer(srv, mint(SECRET, "citysan", 60))
            took = time.monotonic() - t
            assert fresh.status == 401 and fresh.body["reason"] == "store_unavailable", fresh.body
            assert took < 5, took  # bounded (the claim itself: under a second)
            assert http_json(srv.ops_url + "/api/calls")[1]["calls"] == []  # never admitted
        assert [metric(srv, REFUSED) for srv in agents] == [n + 1 for n in before]
        sid = "CA" + "2" * 32  # a fresh grant cannot be checked either: refused, not admitted unchecked
        down = twilio_stream(two, sid, run(twilio_stream_parameters(two.url, TWILIO_TOKEN, call_sid=sid)), 1.0)
        assert down.close_code == 1008 and down.agent_seconds == 0, down.close_code

        redis_srv.start()  # back on the same port: the agents take token calls again, no restart
        for srv in agents:
            back = offer(srv, mint(SECRET, "citysan", 60))
            assert back.status == 200, back.body
        assert no_calls(one) and no_calls(two)
        warned = [ln for srv in agents for ln in srv.lines() if ln.get("event") == "replay_store_unavailable"]
        assert len(warned) == 2 and all(ln["level"] == "warning" for ln in warned), warned
    finally:
        for srv in agents:
            srv.stop()
