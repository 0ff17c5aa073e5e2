"""Scale-out with the real engines on loopback, running the shipped configs in deploy/:
Kamailio (dispatcher, call load) in front of three SIP agents, HAProxy (/readyz checks,
leastconn, WebSockets) in front of two agents' HTTP.

One farm of three real agents (2 call slots each) serves the whole module; a test that stops
an agent starts it again on the same ports before it ends (as a rolling upgrade does).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support import ROOT, free_port, poll, require, rtp_ports, speech_wav, stable_port
from tests.support.farm import Daemon, Kamailio
from tests.support.server import ServerProcess, http_json, http_text
from tests.support.sip_trace import Sipp, sip_options

KAMAILIO_CFG = ROOT / "deploy" / "kamailio" / "kamailio.cfg"
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
SCENARIOS = Path(__file__).parent / "sipp"
SLOTS = 2  # engine.max_calls of every agent (and its maxload in dispatcher.list)
AGENTS = 3


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


# -- the agents ------------------------------------------------------------------------------------
class Agent:
    """One real agent (`serve` subprocess) that can be stopped and started again on its ports."""

    def __init__(self, index: int, tmp: Path, cache: Path):
        self.index, self.tmp, self.cache = index, tmp, cache
        self.name = f"agent-{index + 1}"
        # restarted on these same ports: below the ephemeral range, so no caller can take them
        self.http_port = stable_port()
        self.sip_port = stable_port()
        self.rtp_port = rtp_ports()
        self.generation = 0
        self.srv: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def sip_uri(self) -> str:
        return f"sip:127.0.0.1:{self.sip_port}"

    def start(self) -> None:
        self.generation += 1
        d = self.tmp / f"{self.name}-{self.generation}"
        d.mkdir(parents=True)
        self.srv = ServerProcess(d, self.cache, {
            "engine": {"max_calls": SLOTS, "retry_after_s": 2},
            "http": {"port": self.http_port},
            "sip": {"enabled": True, "port": self.sip_port, "rtp_port": self.rtp_port},
            "twilio": {"enabled": True}, "telnyx": {"enabled": True},
            "media_timeout_s": 10,
            "drain_timeout_s": 20,
        })
        # ServerProcess picked its own ports; the overrides above won (same ports every start)
        self.srv.port, self.srv.sip_port, self.srv.url = self.http_port, self.sip_port, self.url

    @property
    def alive(self) -> bool:
        return self.srv is not None and self.srv.proc.poll() is None

    def calls(self) -> list[dict]:
        return http_json(self.srv.ops_url + "/api/calls")[1]["calls"] if self.alive else []

    def call_ends(self, endpoint: str) -> list[dict]:
        return [ln for ln in self.srv.lines() if ln.get("event") == "call_end" and ln.get("endpoint") == endpoint]

    def refused(self) -> int:
        """INVITEs/offers this agent refused (draining or busy), from its metrics."""
        text = http_text(self.srv.ops_url + "/metrics")
        return sum(int(float(v)) for v in re.findall(r'personaplex_calls_total\{[^}]*outcome="refused_[a-z]+"\} (\S+)',
                                                    text))


class Farm:
    def __init__(self, tmp: Path, cache: Path):
        self.agents = [Agent(i, tmp, cache) for i in range(AGENTS)]

    def ensure_up(self) -> None:
        """Every agent running and ready (restarting any a test stopped or left draining), no
        calls left."""
        for a in self.agents:
            if a.alive and http_json(a.srv.ops_url + "/readyz")[1].get("draining"):
                a.srv.stop(signal.SIGKILL, expect_exit=None)
        down = [a for a in self.agents if not a.alive]
        for a in down:
            if a.srv is not None:
                a.srv.stop()
            a.start()
        for a in down:
            a.srv.wait_ready()
        for a in self.agents:
            assert not poll(a.calls, lambda c: not c, 15), f"{a.name} still has calls"

    def counts(self) -> list[int]:
        return [len(a.calls()) for a in self.agents]

    def stop(self) -> None:
        """Stop every agent, checking each one's exit and log; the first failure is raised once
        all are stopped."""
        failures = []
        for a in self.agents:
            if a.srv is not None:
                try:
                    a.srv.stop()
                except AssertionError as exc:
                    failures.append(f"{a.name}: {exc}")
        assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def farm(tmp_path_factory, demo_dir):
    require("pjsua2")
    f = Farm(tmp_path_factory.mktemp("farm"), demo_dir.parent)
    for a in f.agents:
        a.start()
    try:
        for a in f.agents:
            a.srv.wait_ready()
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def ulaw(tmp_path_factory):
    require("espeak-ng")
    require("sox")
    d = tmp_path_factory.mktemp("sipaudio")
    wav = speech_wav(d / "caller8k.wav", "Hello, my name is Omar Torres, when is my next pickup?", 8000)
    out = d / "caller_ulaw.wav"
    subprocess.run(["sox", str(wav), "-e", "u-law", str(out)], check=True)
    return out


# -- Kamailio (tests/support/farm.py) -------------------------------------------------------------
@pytest.fixture(scope="module")
def kamailio(farm, tmp_path_factory):
    # the shipped config with a dispatcher list of these agents, an address list allowing 127.0.0.1
    kam = Kamailio(tmp_path_factory.mktemp("kamailio"), farm.agents, SLOTS)
    try:
        kam.wait_all_active(farm.agents)
        yield kam
    finally:
        kam.stop()


def place(kam, tmp, ulaw, calls, hold_ms) -> Sipp:
    """`calls` sipp callers at once through the proxy, each `hold_ms` long (RTP streamed to the
    agent the answer names); wait() gives (status, trace)."""
    return Sipp(kam.port, SCENARIOS / "uac_proxy_call.xml", "1001", tmp, {"@RTP_FILE@": str(ulaw)}, timeout=40,
                extra=["-d", str(hold_ms)], calls=calls).start()


def expect_refusal(kam, tmp, code: str, header_re: str) -> tuple[int, str]:
    return Sipp(kam.port, SCENARIOS / "uac_expect.xml", "1001", tmp,
                {"@CODE@": code, "@HEADER@": "-", "@HEADER_RE@": header_re}, timeout=15).start().wait()


def options(agent: Agent) -> str:
    """The status line an agent answers an out-of-dialog OPTIONS with (as the proxy's probe)."""
    return sip_options(agent.sip_port, agent.sip_uri)


def sip_ends(farm: Farm) -> list[list[dict]]:
    return [a.call_ends("sip") if a.srv else [] for a in farm.agents]


# -- tests: the shipped configs --------------------------------------------------------------------
def test_shipped_configs_pass_their_engines_checks():
    """As shipped, with no environment: each engine's own config check passes."""
    require("kamailio")
    require("haproxy")
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin") + ":/usr/sbin:/sbin"}
    kam = subprocess.run(["kamailio", "-c", "-f", str(KAMAILIO_CFG)], capture_output=True, text=True, env=env,
                         timeout=30)
    assert kam.returncode == 0 and "config file ok" in kam.stdout + kam.stderr, kam.stdout + kam.stderr
    hap = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, env=env,
                         timeout=30)
    assert hap.returncode == 0, hap.stdout + hap.stderr
    # the list template parses as dispatcher lines: group, URI, flags, priority, duid and maxload
    rows = [ln.split() for ln in (ROOT / "deploy" / "kamailio" / "dispatcher.list").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert rows and all(len(r) == 5 and r[1].startswith("sip:") and "duid=" in r[4] and "maxload=" in r[4]
                        for r in rows)
    # the agent's unit: systemd's own check (only the install paths of a real machine are missing here)
    unit = ROOT / "deploy" / "systemd" / "personaplex-agent.service"
    require("systemd-analyze")
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30)
    problems = [ln for ln in (res.stdout + res.stderr).splitlines() if ln and "is not executable" not in ln]
    assert not problems, problems
    settings = dict(ln.split("=", 1) for ln in unit.read_text().splitlines() if "=" in ln and ln[:1].isalpha())
    assert settings["KillSignal"] == "SIGTERM" and settings["Restart"] == "on-failure"
    import yaml

    drain = yaml.safe_load((ROOT / "configs" / "production.yaml").read_text())["drain_timeout_s"]
    assert int(settings["TimeoutStopSec"]) > drain  # above the production drain timeout, as its comments ask


# -- tests: Kamailio in front of three agents -----------------------------------------------------
def test_sip_calls_spread_by_load_and_one_over_capacity_gets_503(farm, kamailio, ulaw, tmp_path):
    """6 simultaneous calls over 3 agents of 2 slots: 2 each (algorithm 10, maxload 2), RTP
    straight to the agents; a 7th call meanwhile is refused by the proxy, no agent asked."""
    farm.ensure_up()
    kamailio.wait_all_active(farm.agents)
    before = [len(e) for e in sip_ends(farm)]
    refused_before = [a.refused() for a in farm.agents]
    calls = place(kamailio, tmp_path, ulaw, calls=AGENTS * SLOTS, hold_ms=5000)
    counts = poll(farm.counts, lambda c: sum(c) == AGENTS * SLOTS, 15)
    assert counts == [SLOTS] * AGENTS, (counts, kamailio.log_tail())
    assert options(farm.agents[0]) == "SIP/2.0 503 Full"  # full: the probe takes it out too
    # the farm's capacity is the sum of its slots: one more call gets 503 from the proxy itself
    rc, msgs = expect_refusal(kamailio, tmp_path, "503", "SIP/2.0 503 All Agents Busy")
    assert rc == 0, msgs
    assert "Retry-After: 5" in msgs
    assert [a.refused() for a in farm.agents] == refused_before  # no agent saw that INVITE
    rc, msgs = calls.wait()
    assert rc == 0, msgs
    ends = [e[b:] for e, b in zip(poll(lambda: sip_ends(farm), lambda e: sum(map(len, e)) >= sum(before) + 6, 10),
                                   before)]
    assert [len(e) for e in ends] == [SLOTS] * AGENTS
    for e in (x for per_agent in ends for x in per_agent):
        # the caller's BYE ended it, and the caller's RTP reached the agent directly
        assert e["reason"] == "caller_hangup" and e["frames_in"] > 5 and e["caller_peak"] > 0.05, e
    print(f"\nspread: {[len(e) for e in ends]} calls per agent; 7th call: 503 from the proxy")


@pytest.mark.slow
def test_sip_sigterm_drains_one_agent_and_a_restart_rejoins(farm, kamailio, ulaw, tmp_path):
    """Rolling upgrade of one agent: SIGTERM with a live call; the call runs to its own BYE,
    the probe (OPTIONS 503 "Draining") takes the agent out, every new call lands on the
    others with no caller seeing a failure; the restarted agent rejoins at its first 200."""
    farm.ensure_up()
    kamailio.wait_all_active(farm.agents)
    live = place(kamailio, tmp_path, ulaw, calls=1, hold_ms=8000)
    counts = poll(farm.counts, lambda c: sum(c) == 1, 15)
    assert sum(counts) == 1, kamailio.log_tail()
    x = farm.agents[counts.index(1)]
    others = [a for a in farm.agents if a is not x]
    refused_before = x.refused()
    t0 = time.monotonic()
    assert options(x) == "SIP/2.0 200 OK"
    x.srv.proc.send_signal(signal.SIGTERM)
    # new calls right away, before or after the probe has noticed: all land on the others
    fresh = place(kamailio, tmp_path, ulaw, calls=2 * SLOTS, hold_ms=2500)
    out_after = kamailio.wait_state(x.sip_uri, "I", 8)
    assert out_after is not None, (kamailio.states(), kamailio.log_tail())
    assert options(x) == "SIP/2.0 503 Draining"
    counts = poll(farm.counts, lambda c: sum(c) == 1 + 2 * SLOTS, 15)
    assert counts[counts.index(1)] == 1 and sorted(counts) == [1, SLOTS, SLOTS], counts
    assert len(x.calls()) == 1  # only the call it had
    refused_by_x = x.refused() - refused_before  # INVITEs it refused (503) before the probe told the proxy
    rc, msgs = fresh.wait()
    assert rc == 0, msgs  # no caller saw a failure
    rc, msgs = live.wait()
    assert rc == 0, msgs  # the live call ran to its own BYE
    assert x.srv.proc.wait(20) == 0  # drained: exits 0 once its call is over
    drained_s = time.monotonic() - t0
    (end,) = x.call_ends("sip")[-1:]
    assert end["reason"] == "caller_hangup" and end["duration_s"] > 6, end
    assert sum(len(a.call_ends("sip")) for a in others) >= 2 * SLOTS
    failovers = kamailio.log().count("failed over (503)")
    # the new version starts on the same address and rejoins at its first OPTIONS 200
    t1 = time.monotonic()
    x.srv.stop()
    x.start()
    x.srv.wait_ready()
    ready_s = time.monotonic() - t1
    assert kamailio.wait_state(x.sip_uri, "A", 8) is not None, kamailio.states()
    rejoin_s = time.monotonic() - t1
    again = place(kamailio, tmp_path, ulaw, calls=AGENTS, hold_ms=1500)
    counts = poll(farm.counts, lambda c: sum(c) == AGENTS, 15)
    assert counts == [1] * AGENTS, counts  # the restarted agent takes its share again
    rc, msgs = again.wait()
    assert rc == 0, msgs
    print(f"\nSIGTERM: out of rotation {out_after:.2f} s after the signal (OPTIONS 503); INVITEs it refused "
          f"before that: {refused_by_x}, failed over by the proxy: {failovers}; its live call kept to its BYE, "
          f"exit 0 {drained_s:.1f} s after the signal; restarted agent ready in {ready_s:.1f} s, in rotation "
          f"{rejoin_s:.1f} s after the restart began")


def test_sip_sigkill_fails_over_and_the_probe_takes_the_agent_out(farm, kamailio, ulaw, tmp_path):
    """An agent killed outright: calls sent to it before anyone noticed fail over after the
    proxy's 2 s no-answer timer (the callers only wait longer); with no call to notice it, the
    OPTIONS probe alone takes it out of rotation."""
    farm.ensure_up()
    kamailio.wait_all_active(farm.agents)
    z = farm.agents[0]
    others = farm.agents[1:]
    before = [len(a.call_ends("sip")) for a in others]
    log_before = len(kamailio.log())
    z.srv.proc.send_signal(signal.SIGKILL)
    z.srv.stop(expect_exit=-signal.SIGKILL)  # killed, as meant; its log is still checked
    # one call per agent by load: one of them goes to the dead agent, still in rotation (no probe
    # or INVITE has timed out on it yet)
    calls = place(kamailio, tmp_path, ulaw, calls=AGENTS, hold_ms=1500)
    rc, msgs = calls.wait()
    assert rc == 0, msgs  # every caller got an agent
    first_run_s = calls.elapsed
    log = kamailio.log()[log_before:]
    assert f"agent {z.sip_uri} did not answer" in log and "failed over (408)" in log, log[-3000:]
    ends = poll(lambda: [len(a.call_ends("sip")) - b for a, b in zip(others, before)],
                lambda n: sum(n) >= AGENTS, 10)
    assert sum(ends) == AGENTS, ends
    assert kamailio.states()[z.sip_uri].startswith("I")
    # the probe alone: put the dead agent back in rotation by hand and time its removal
    kamailio.rpc("dispatcher.set_state", "ap", "1", z.sip_uri)
    assert kamailio.states()[z.sip_uri].startswith("A")
    probe_s = kamailio.wait_state(z.sip_uri, "I", 8)
    assert probe_s is not None and probe_s < 5, (probe_s, kamailio.states())
    # and then no new call goes near it
    log_before = len(kamailio.log())
    calls = place(kamailio, tmp_path, ulaw, calls=2, hold_ms=1000)
    rc, msgs = calls.wait()
    assert rc == 0, msgs
    assert "failed over" not in kamailio.log()[log_before:]
    print(f"\nSIGKILL: {AGENTS} calls placed right after the kill all answered, the one sent to the dead agent "
          f"failed over on the 2 s timer (all {AGENTS} calls of {1.5:.1f} s done {first_run_s:.1f} s after the "
          f"kill); probe alone took the dead agent out in {probe_s:.2f} s")


# -- HAProxy in front of two agents ----------------------------------------------------------------
class HAProxy(Daemon):
    """deploy/haproxy/haproxy.cfg as shipped; its addresses from the environment it documents.
    Stopped with SIGUSR1 (HAProxy's soft stop, exit 0; SIGTERM is its hard stop); its own
    `[ALERT]` lines are errors, its syslog copies of them are not counted twice."""

    STOP_SIGNAL = signal.SIGUSR1
    ERRORS = re.compile(r"^\[ALERT\]")

    def __init__(self, tmp: Path, servers: list[str]):
        require("haproxy")
        self.port = free_port()
        self.sock = tmp / "haproxy.sock"
        self.log_path = tmp / "haproxy.log"
        env = dict(os.environ, HAPROXY_BIND=f"127.0.0.1:{self.port}", HAPROXY_STATS=str(self.sock),
                   HAPROXY_LOG="stdout", AGENT1=servers[0], AGENT2=servers[1])
        self._spawn(["haproxy", "-db", "-f", str(HAPROXY_CFG)], env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def api(self, cmd: str) -> str:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(3)
        try:
            s.connect(str(self.sock))
            s.sendall(cmd.encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out.decode()
        except OSError:
            return ""
        finally:
            s.close()

    def status(self, backend: str = "agents") -> dict[str, str]:
        """server name -> UP / DOWN (from `show stat`)."""
        rows = [ln.split(",") for ln in self.api("show stat").splitlines() if ln and not ln.startswith("#")]
        return {r[1]: r[17].split()[0] for r in rows if len(r) > 17 and r[0] == backend
                and r[1] not in ("FRONTEND", "BACKEND")}

    def wait_status(self, want: dict[str, str], timeout: float = 10, backend: str = "agents") -> float | None:
        t0 = time.monotonic()
        got = poll(lambda: self.status(backend), lambda s: all(s.get(k) == v for k, v in want.items()), timeout,
                   step=0.05)
        return time.monotonic() - t0 if all(got.get(k) == v for k, v in want.items()) else None



def test_http_offers_spread_and_a_draining_agent_leaves_rotation(farm, caller_wav, tmp_path):
    """Browser-style offers (aiortc) through HAProxy spread over both agents; SIGTERM one: its
    /readyz turns 503, HAProxy takes it out, the next offer goes to the other agent, and the
    drained agent's call goes on until the caller hangs up."""
    from tests.support.webrtc_client import WebRtcCaller

    farm.ensure_up()
    a, b = farm.agents[:2]
    hap = HAProxy(tmp_path, [f"127.0.0.1:{a.http_port}", f"127.0.0.1:{b.http_port}"])
    # agent1 drains and agent2 then holds both its slots (its /readyz says 503): for a moment no
    # agent is ready, which HAProxy reports as an alert
    hap.allow(r"backend '(agents|agent_media)' has no server available")
    try:
        assert hap.wait_status({"agent1": "UP", "agent2": "UP"}) is not None, hap.log_path.read_text()

        async def scenario():
            first = [WebRtcCaller(hap.url, "citysan", caller_wav) for _ in range(2)]
            for c in first:
                assert await c.call() == 200, c.body
            loop = asyncio.get_running_loop()
            spread = await loop.run_in_executor(None, poll, lambda: [len(a.calls()), len(b.calls())],
                                                lambda n: sum(n) == 2, 10)
            assert spread == [1, 1], spread  # one offer per agent (leastconn, ties in turn)
            held = next(c for c in first if c.body["call_id"] == a.calls()[0]["call_id"])
            a.srv.proc.send_signal(signal.SIGTERM)  # agent1 drains
            down_after = await loop.run_in_executor(None, hap.wait_status, {"agent1": "DOWN"}, 10)
            assert down_after is not None, hap.status()
            refused_before = a.refused()
            late = WebRtcCaller(hap.url, "citysan", caller_wav)
            assert await late.call() == 200, late.body  # answered by agent2
            assert (await loop.run_in_executor(None, poll, lambda: len(b.calls()), lambda n: n == 2, 10)) == 2
            assert a.refused() == refused_before  # agent1 never saw it
            # the draining agent's call still flows
            # (the agent's sound, not packets: the track sends silence every 20 ms anyway)
            got = len(held.received)
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and held.loud(got) <= 25:
                await asyncio.sleep(0.1)
            assert held.loud(got) > 25 and "ended" not in held.kinds(), (held.loud(got), len(held.received) - got)
            assert [c["call_id"] for c in a.calls()] == [held.body["call_id"]]
            for c in [*first, late]:
                await c.hangup()
            return spread, down_after

        spread, down_after = run(scenario())
        assert a.srv.proc.wait(20) == 0  # its last call ended: drained, exit 0
        (end,) = a.call_ends("webrtc")[-1:]
        assert end["reason"] == "caller_hangup", end
        print(f"\nHAProxy: offers spread {spread}; draining agent marked DOWN {down_after:.2f} s after SIGTERM; "
              "its call went on to the caller's hang-up")
    finally:
        hap.stop()


def test_carrier_websockets_stay_on_their_agent_and_spread_by_live_connections(farm, caller_wav, tmp_path):
    """Twilio and Telnyx media streams through HAProxy to the real agents: leastconn puts the
    two streams on different agents; SIGTERM one (its /readyz turns 503): HAProxy takes it out,
    its open stream stays on it and the caller keeps hearing the agent until it hangs up, the
    next stream goes to the other agent, and the drained agent exits 0. Per-agent operations
    data (/metrics) is not served through the front."""
    import aiohttp

    from tests.support.carriers import TelnyxCaller, TwilioCaller

    farm.ensure_up()
    a, b = farm.agents[:2]
    hap = HAProxy(tmp_path, [f"127.0.0.1:{a.http_port}", f"127.0.0.1:{b.http_port}"])
    # the other agent then holds both its slots (its /readyz says 503) while the first drains
    hap.allow(r"backend '(agents|agent_media)' has no server available")
    ws_url = hap.url.replace("http://", "ws://", 1)

    def twilio(seconds):
        c = TwilioCaller(ws_url + "/twilio/media", auth_token=a.srv.twilio_token,
                         parameters={"to": "+14155550100"}, wav_or_pcm=caller_wav)
        return c, asyncio.create_task(c.run(seconds))

    def telnyx(seconds):
        c = TelnyxCaller(ws_url + "/telnyx/media", auth_token=a.srv.telnyx_token, dialled="+14155550100",
                         wav_or_pcm=caller_wav)
        return c, asyncio.create_task(c.run(seconds))

    def endpoints(agent):
        return sorted(c["endpoint"] for c in agent.calls())

    try:
        assert hap.wait_status({"agent1": "UP", "agent2": "UP"}) is not None, hap.log_path.read_text()
        assert hap.wait_status({"agent1": "UP", "agent2": "UP"}, backend="agent_media") is not None

        async def scenario():
            loop = asyncio.get_running_loop()

            def wait_for(fn, ok, timeout=10):
                return loop.run_in_executor(None, poll, fn, ok, timeout)

            held, held_run = twilio(14.0)
            assert await wait_for(lambda: len(a.calls()) + len(b.calls()), lambda n: n == 1) == 1
            other, other_run = telnyx(5.0)
            spread = await wait_for(lambda: [endpoints(a), endpoints(b)], lambda e: sum(map(len, e)) == 2)
            assert sorted(spread) == [["telnyx"], ["twilio"]], spread  # one stream per agent (leastconn)
            owner, rest = (a, b) if spread[0] == ["twilio"] else (b, a)
            name = "agent1" if owner is a else "agent2"
            owner.srv.proc.send_signal(signal.SIGTERM)  # the Twilio stream's agent drains
            down_after = await loop.run_in_executor(None, hap.wait_status, {name: "DOWN"}, 10, "agent_media")
            assert down_after is not None, hap.status("agent_media")
            refused_before = owner.refused()
            late, late_run = twilio(4.0)
            assert await wait_for(lambda: endpoints(rest), lambda e: e == ["telnyx", "twilio"]) == ["telnyx", "twilio"]
            assert owner.refused() == refused_before and endpoints(owner) == ["twilio"]  # it never saw the new one
            # the draining agent's stream goes on: the agent's sound keeps reaching its caller
            got = len(held.agent_pcm)
            await asyncio.sleep(3.0)
            new = held.agent_pcm[got:]
            assert len(new) >= 2.5 * held.rate and float(np.sqrt(np.mean(new ** 2))) > 0.01, len(new)
            async with aiohttp.ClientSession() as http, http.get(hap.url + "/metrics") as r:
                metrics_status = r.status
            await asyncio.gather(held_run, other_run, late_run)
            return owner, held, [held, other, late], down_after, metrics_status

        owner, held, callers, down_after, metrics_status = run(scenario())
        for c in callers:
            assert c.protocol_errors == [] and not c.closed_by_server, (c.carrier, c.protocol_errors, c.close_code)
        assert metrics_status == 403  # per-agent operations data is not served through the front
        assert owner.srv.proc.wait(20) == 0  # its last call ended: drained, exit 0
        (end,) = owner.call_ends("twilio")[-1:]
        assert end["reason"] == "caller_hangup" and end["caller_peak"] > 0.05, end
        print(f"\nHAProxy: carrier streams spread one per agent; draining agent marked DOWN for media "
              f"{down_after:.2f} s after SIGTERM, its stream went on to the caller's stop")
    finally:
        hap.stop()
