"""The security review's holes, at the level of the functions that close them: client addresses
behind proxies, race-free per-client places, Twilio's per-call stream grants, offers with one
audio section, built-in variables that carried context cannot overwrite."""

from __future__ import annotations

import threading
import time

import pytest

from agent.calls.context import ContextResolver, token_travels_in_clear
from telephony.security.limits import ClientLimits, client_address
from telephony.security.replay import LocalReplayStore
from telephony.streams.twilio import GRANT_PARAMETER, grant_problem, stream_grant
from telephony.webrtc.transport import offer_problem

HAPROXY = ["10.0.0.5/32"]


# ---- X-Forwarded-For ----------------------------------------------------------------------------

def test_an_untrusted_peer_is_the_client_whatever_it_claims():
    assert client_address("198.51.100.7", ["1.2.3.4"], HAPROXY) == "198.51.100.7"
    assert client_address("198.51.100.7", ["1.2.3.4"], []) == "198.51.100.7"


def test_the_hop_haproxy_appended_counts_not_what_the_client_wrote_before_it():
    # the client sent "X-Forwarded-For: 1.2.3.4"; HAProxy appended the real peer, 203.0.113.9
    assert client_address("10.0.0.5", ["1.2.3.4, 203.0.113.9"], HAPROXY) == "203.0.113.9"
    # ... also when the client's line and HAProxy's are separate header lines
    assert client_address("10.0.0.5", ["1.2.3.4", "203.0.113.9"], HAPROXY) == "203.0.113.9"
    # rotating the spoofed part changes nothing
    keys = {client_address("10.0.0.5", [f"9.9.9.{i}", "203.0.113.9"], HAPROXY) for i in range(20)}
    assert keys == {"203.0.113.9"}


def test_the_walk_passes_every_trusted_hop_and_stops_at_junk():
    trusted = ["10.0.0.0/24"]
    assert client_address("10.0.0.5", ["203.0.113.9, 10.0.0.7"], trusted) == "203.0.113.9"
    # junk nearest to us: the last hop we trust is the client (never the junk, never further left)
    assert client_address("10.0.0.5", ["203.0.113.9, not-an-ip"], trusted) == "10.0.0.5"
    assert client_address("10.0.0.5", ["203.0.113.9, 10.0.0.7, <script>"], trusted) == "10.0.0.5"
    # all trusted: the leftmost trusted address
    assert client_address("10.0.0.5", ["10.0.0.8"], trusted) == "10.0.0.8"
    assert client_address("10.0.0.5", [], trusted) == "10.0.0.5"


def test_ipv6_clients_are_keyed_by_their_64():
    a = client_address("2001:db8:1:2::10", [], [])
    b = client_address("2001:db8:1:2:ffff::1", [], [])
    c = client_address("2001:db8:1:3::1", [], [])
    assert a == b == "2001:db8:1:2::/64" and c != a
    assert client_address("::ffff:198.51.100.7", [], []) == "198.51.100.7"  # v4-mapped


def test_concurrent_places_are_held_at_the_attempt_race_free():
    limits = ClientLimits(concurrent_calls=2, attempts_per_minute=1000)
    results: list = []
    barrier = threading.Barrier(8)

    def offer():
        barrier.wait()
        results.append(limits.attempt("203.0.113.9"))
    threads = [threading.Thread(target=offer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [r for r in results if isinstance(r, str)]
    assert len(held) == 2  # never more than the limit, however many arrive at once
    limits.ended("203.0.113.9", held[0])
    assert isinstance(limits.attempt("203.0.113.9"), str)


def test_refused_attempts_have_their_own_bucket():
    good, bad = ClientLimits(2, 3), ClientLimits(2, 3)
    for _ in range(3):
        assert bad.count("203.0.113.9") is None
    assert bad.count("203.0.113.9") is not None  # junk is limited...
    assert isinstance(good.attempt("203.0.113.9"), str)  # ...callers with valid tokens are not


# ---- Twilio stream grants -----------------------------------------------------------------------

TOKEN = "twilio-auth-token-for-tests"


def test_a_grant_admits_its_own_call_only_until_it_expires():
    now = time.time()
    params = {"to": "+14155550100", "from": "+14155550111"}
    grant = stream_grant(TOKEN, "CA1", params, int(now) + 60)
    ok = dict(params, **{GRANT_PARAMETER: grant})
    assert grant_problem(TOKEN, "CA1", ok, now) is None
    assert "not valid" in grant_problem(TOKEN, "CA2", ok, now)  # another call
    assert "not valid" in grant_problem(TOKEN, "CA1", dict(ok, to="+19995550000"), now)  # other parameters
    assert "not valid" in grant_problem("another-token", "CA1", ok, now)
    assert "expired" in grant_problem(TOKEN, "CA1", ok, now + 61)
    assert "no grant" in grant_problem(TOKEN, "CA1", params, now)
    assert "malformed" in grant_problem(TOKEN, "CA1", dict(params, **{GRANT_PARAMETER: "x"}), now)
    # the expiry is covered by the MAC: pushing it out breaks the grant
    mac = grant.partition(".")[2]
    assert "not valid" in grant_problem(TOKEN, "CA1", dict(params, **{GRANT_PARAMETER: f"{int(now) + 9999}.{mac}"}), now)


def test_replay_store_claims_once():
    store = LocalReplayStore()
    assert store.claim("a", time.time() + 60) and not store.claim("a", time.time() + 60)
    assert store.claim("b", time.time() - 1) and store.claim("b", time.time() + 60)  # expired ones are forgotten


# ---- WebRTC offers ------------------------------------------------------------------------------

AUDIO = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
DATA = "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"


@pytest.mark.parametrize("sdp,ok", [
    (AUDIO, True), (AUDIO + DATA, True),
    ("v=0\r\n", False), (AUDIO + AUDIO[5:], False), (AUDIO + DATA + DATA, False),
    (AUDIO + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n", False),
])
def test_offers_have_one_audio_and_at_most_one_data_section(sdp, ok):
    assert (offer_problem(sdp) is None) is ok


# ---- built-in variables -------------------------------------------------------------------------

def test_carried_and_looked_up_context_never_overwrite_the_transports_numbers():
    started = []
    resolver = ContextResolver(lookup=type("NoLookup", (), {"enabled": False})(),
                               start=lambda session, values: started.append(values))
    session = type("S", (), {"call_id": "c1", "endpoint": "sip", "log": type("L", (), {"info": lambda *a, **k: None})(),
                             "variables": {}})()
    resolver.begin(session, "+14155550100", "+14155550111",
                   {"caller_number": "+19995550000", "dialled_number": "victim", "account_id": "A1"})
    assert started == [{"caller_number": "+14155550111", "dialled_number": "+14155550100", "account_id": "A1"}]


def test_bearer_tokens_never_travel_in_clear():
    assert token_travels_in_clear("http://crm.example.com/lookup")
    assert not token_travels_in_clear("https://crm.example.com/lookup")
    assert not token_travels_in_clear("http://127.0.0.1:8080/lookup")
    assert not token_travels_in_clear("http://localhost/lookup")


# ---- call tokens ----------------------------------------------------------------------------------

def test_tokens_check_the_audience_and_are_used_up_only_by_claim():
    from telephony.security.tokens import TokenRejected, TokenVerifier, mint

    secret = "s" * 32
    v = TokenVerifier(secret, audience="agent.example.com")
    for token, reason in ((mint(secret, "citysan", 60), "invalid"),  # no aud at all
                          (mint(secret, "citysan", 60, audience="other.example.com"), "wrong_audience")):
        with pytest.raises(TokenRejected) as exc:
            v.check(token, None)
        assert exc.value.reason == reason
    token = mint(secret, "citysan", 60, audience="agent.example.com")
    grant = v.check(token, None)
    assert v.check(token, None) == grant  # checking twice uses nothing up (a limit refusal between)
    v.claim(grant)
    with pytest.raises(TokenRejected) as exc:
        v.claim(v.check(token, None))
    assert exc.value.reason == "reused"


def test_an_unreachable_replay_store_refuses_the_token():
    from telephony.security.replay import ReplayStoreUnavailable
    from telephony.security.tokens import TokenRejected, TokenVerifier, mint

    class Down:
        def claim(self, jti, expires_at):
            raise ReplayStoreUnavailable("connection refused")

        def close(self):
            pass
    v = TokenVerifier("s" * 32, store=Down())
    with pytest.raises(TokenRejected) as exc:
        v.verify(mint("s" * 32, "citysan", 60), None)
    assert exc.value.reason == "store_unavailable"
