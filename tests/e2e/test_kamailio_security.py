"""The shipped Kamailio front (deploy/kamailio/kamailio.cfg) guards the farm: REFER from outside
is refused, only sources of the address list may send requests, a flooding source is dropped.

Every test runs its own Kamailio from the shipped file on 127.0.0.1 (pike's per-address state
must not leak from one test to the next) in front of a stand-in agent: a plain UDP SIP endpoint
that answers the proxy's OPTIONS probe with 200 and a call as a minimal UAS would, and records
every other request it gets, so a test sees exactly what the proxy relayed. Callers are plain
UDP sockets too. Caller and agent share 127.0.0.1: the proxy tells the farm from the rest by
port (FARM_MATCH 2), and the address lists below allow or refuse callers by port.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import pytest

from tests.support import ROOT, poll
from tests.support.farm import Kamailio

SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


@dataclass
class Msg:
    """One SIP message as received: first line, headers in order, body."""

    first: str
    headers: list[tuple[str, str]]
    body: str

    @classmethod
    def parse(cls, data: bytes) -> "Msg":
        head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
        first, *lines = head.split("\r\n")
        headers = [(n.strip(), v.strip()) for n, _, v in (ln.partition(":") for ln in lines if ln)]
        return cls(first, headers, body)

    @property
    def status(self) -> int | None:
        m = re.match(r"SIP/2\.0 (\d{3})", self.first)
        return int(m.group(1)) if m else None

    @property
    def method(self) -> str | None:
        return None if self.status is not None else self.first.split(" ", 1)[0]

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def hdr(self, name: str) -> str:
        found = self.all(name)
        return found[0] if found else ""

    @property
    def branch(self) -> str:
        m = re.search(r"branch=([^;\s]+)", self.hdr("Via"))
        return m.group(1) if m else ""


class Peer:
    """A SIP endpoint on one UDP socket of 127.0.0.1. A thread records every message it
    receives and answers requests with `answer(msg)` (a status line or None: no answer)."""

    def __init__(self, name: str):
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.tag = uuid.uuid4().hex[:10]
        self.got: list[Msg] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # -- receiving ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, src = self.sock.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            msg = Msg.parse(data)
            with self._lock:
                self.got.append(msg)
            if msg.method:
                status = self.answer(msg)
                if status:
                    self.reply(msg, status, src)

    def answer(self, msg: Msg) -> str | None:
        return None if msg.method == "ACK" else "200 OK"

    def reply(self, req: Msg, status: str, to: tuple[str, int], extra: list[str] | None = None,
              body: str = "") -> None:
        to_hdr = req.hdr("To") if "tag=" in req.hdr("To") else f"{req.hdr('To')};tag={self.tag}"
        lines = [f"SIP/2.0 {status}", *(f"Via: {v}" for v in req.all("Via")), f"From: {req.hdr('From')}",
                 f"To: {to_hdr}", f"Call-ID: {req.hdr('Call-ID')}", f"CSeq: {req.hdr('CSeq')}", *(extra or []),
                 f"Content-Length: {len(body)}"]
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n" + body).encode(), to)

    def messages(self) -> list[Msg]:
        with self._lock:
            return list(self.got)

    def requests(self, skip: tuple[str, ...] = ("OPTIONS",)) -> list[Msg]:
        """The requests received, but for the proxy's OPTIONS probes."""
        return [m for m in self.messages() if m.method and m.method not in skip]

    def responses(self, branch: str) -> list[Msg]:
        return [m for m in self.messages() if m.status is not None and m.branch == branch]

    # -- sending -----------------------------------------------------------------------------
    def send(self, port: int, method: str, ruri: str, headers: list[str], body: str = "",
             branch: str | None = None) -> str:
        """One request to 127.0.0.1:`port`; its Via branch."""
        branch = branch or "z9hG4bK" + uuid.uuid4().hex[:16]
        lines = [f"{method} {ruri} SIP/2.0", f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch}",
                 "Max-Forwards: 70", *headers, f"Content-Length: {len(body)}"]
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n" + body).encode(), ("127.0.0.1", port))
        return branch

    def transact(self, port: int, method: str, ruri: str, headers: list[str], body: str = "",
                 timeout: float = 6) -> Msg | None:
        """A request and its final answer (retransmitted as UDP wants until one comes), or None."""
        branch = self.send(port, method, ruri, headers, body)
        deadline, interval = time.monotonic() + timeout, 0.5
        while time.monotonic() < deadline:
            final = poll(lambda: [m for m in self.responses(branch) if m.status >= 200], bool,
                         min(interval, deadline - time.monotonic()), step=0.02)
            if final:
                return final[0]
            if not self.responses(branch):  # nothing at all yet (not even 100 Trying): again
                self.send(port, method, ruri, headers, body, branch)
            interval = min(interval * 2, 2)
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


class StandInAgent(Peer):
    """The dispatcher's destination: OPTIONS (the probe) and BYE 200, an INVITE answered 200 with
    SDP (Record-Route kept, Contact itself), REFER refused as real agents do (405)."""

    @property
    def sip_uri(self) -> str:
        return f"sip:127.0.0.1:{self.port}"

    def answer(self, msg: Msg) -> str | None:
        return "405 Method Not Allowed" if msg.method == "REFER" else super().answer(msg)

    def reply(self, req, status, to, extra=None, body=""):
        if req.method == "INVITE" and status.startswith("200"):
            extra = [*(f"Record-Route: {rr}" for rr in req.all("Record-Route")),
                     f"Contact: <sip:agent@127.0.0.1:{self.port}>", "Content-Type: application/sdp"]
            body = SDP
        super().reply(req, status, to, extra, body)

    def invites(self) -> list[Msg]:
        return [m for m in self.requests() if m.method == "INVITE"]

    def refer_caller(self, kam: Kamailio, invite: Msg) -> Msg | None:
        """The agent's own blind transfer: an in-dialog REFER to the caller of `invite` (the
        INVITE as it reached this agent), along its Record-Route set; the caller's answer."""
        contact = re.search(r"<([^>]+)>", invite.hdr("Contact")).group(1)
        to = f"{invite.hdr('To')};tag={self.tag}" if "tag=" not in invite.hdr("To") else invite.hdr("To")
        return self.transact(kam.port, "REFER", contact, [
            *(f"Route: {rr}" for rr in invite.all("Record-Route")), f"From: {to}", f"To: {invite.hdr('From')}",
            f"Call-ID: {invite.hdr('Call-ID')}", "CSeq: 1 REFER", f"Contact: <sip:agent@127.0.0.1:{self.port}>",
            "Refer-To: <sip:operator@127.0.0.1:5099>"])


class Caller(Peer):
    """A carrier's SBC: places a call through the proxy, sends in-dialog requests along the
    route set the 200 OK gave; accepts a REFER (202) and BYE (200)."""

    def __init__(self, name: str = "caller"):
        super().__init__(name)
        self.call_id = self.dialog = None
        self.cseq = 1

    def answer(self, msg: Msg) -> str | None:
        return "202 Accepted" if msg.method == "REFER" else super().answer(msg)

    def _from(self) -> str:
        return f"From: <sip:caller@127.0.0.1:{self.port}>;tag={self.tag}"

    def invite(self, kam: Kamailio, number: str = "1001") -> Msg | None:
        """An INVITE through the proxy; its final answer (a 2xx is ACKed and opens the dialog)."""
        self.call_id, self.cseq = uuid.uuid4().hex, 1
        ruri = f"sip:{number}@127.0.0.1:{kam.port}"
        final = self.transact(kam.port, "INVITE", ruri, [
            self._from(), f"To: <{ruri}>", f"Call-ID: {self.call_id}", "CSeq: 1 INVITE",
            f"Contact: <sip:caller@127.0.0.1:{self.port}>", "Content-Type: application/sdp"], SDP)
        if final is not None and final.status < 300:
            target = re.search(r"<([^>]+)>", final.hdr("Contact")).group(1)
            routes = [r for v in reversed(final.all("Record-Route")) for r in reversed(v.split(","))]
            self.dialog = {"target": target, "routes": [r.strip() for r in routes], "to": final.hdr("To")}
            self.send(kam.port, "ACK", target, self._in_dialog("ACK", self.cseq))
        return final

    def _in_dialog(self, method: str, cseq: int) -> list[str]:
        d = self.dialog
        return [*(f"Route: {r}" for r in d["routes"]), self._from(), f"To: {d['to']}", f"Call-ID: {self.call_id}",
                f"CSeq: {cseq} {method}"]

    def request(self, kam: Kamailio, method: str, headers: list[str] | None = None) -> Msg | None:
        """An in-dialog request of the open call, through the proxy; its final answer."""
        self.cseq += 1
        return self.transact(kam.port, method, self.dialog["target"],
                             [*self._in_dialog(method, self.cseq), *(headers or [])])

    def options(self, kam: Kamailio) -> str:
        """An out-of-dialog OPTIONS to the proxy itself (a carrier's keepalive); its branch."""
        cid = uuid.uuid4().hex
        return self.send(kam.port, "OPTIONS", f"sip:127.0.0.1:{kam.port}", [
            self._from(), f"To: <sip:127.0.0.1:{kam.port}>", f"Call-ID: {cid}", "CSeq: 1 OPTIONS"])


@pytest.fixture
def peers():
    made: list[Peer] = []

    def make(cls=Caller, name: str = "caller"):
        made.append(cls(name))
        return made[-1]
    try:
        yield make
    finally:
        for p in made:
            p.close()


@pytest.fixture
def front(tmp_path):
    """Starts the shipped Kamailio in front of `agent` with the address list `addresses`."""
    started: list[Kamailio] = []

    def start(agent: StandInAgent, addresses: str | None = None) -> Kamailio:
        kw = {} if addresses is None else {"addresses": addresses}
        kam = Kamailio(tmp_path / f"kamailio{len(started)}", [agent], 2, **kw)
        started.append(kam)
        kam.wait_all_active([agent])
        return kam
    try:
        yield start
    finally:  # every proxy stopped, then each one's exit and log checked
        failures = []
        for kam in started:
            try:
                kam.stop()
            except AssertionError as exc:
                failures.append(str(exc))
        assert not failures, "\n".join(failures)


def nothing_more(fetch, timeout: float = 1.0):
    """`fetch()` once it has grown, or after `timeout` s with nothing new: a bounded check that
    something does not happen (the proxy answered already; a relay would come at once)."""
    before = fetch()
    return poll(fetch, lambda now: len(now) > len(before), timeout, step=0.05)


# -- REFER --------------------------------------------------------------------------------------------
def test_refer_from_outside_is_refused_and_the_agents_own_refer_passes(front, peers):
    """A caller's REFER in an established call (and out of one) gets 405 from the proxy and never
    reaches the agent; the agent's own blind transfer (an in-dialog REFER to the caller) still
    goes through, as do the rest of the dialog's requests."""
    agent = peers(StandInAgent, "agent")
    caller = peers()
    kam = front(agent)
    answer = caller.invite(kam)
    assert answer is not None and answer.status == 200, (answer, kam.log_tail())
    (inv,) = poll(agent.invites, bool, 5)
    assert "ACK" in [m.method for m in poll(agent.requests, lambda r: len(r) >= 2, 5)]

    # in the dialog, along the Record-Route set: the way a caller would try it
    refused = caller.request(kam, "REFER", ["Refer-To: <sip:+19005550100@127.0.0.1:5099>",
                                            f"Contact: <sip:caller@127.0.0.1:{caller.port}>"])
    # the proxy kept it: the agent never saw it (a real agent would refuse it too, but must not be
    # the one to decide)
    assert [m.method for m in nothing_more(agent.requests)] == ["INVITE", "ACK"], kam.log_tail()
    assert refused is not None and refused.first == "SIP/2.0 405 Method Not Allowed", refused
    assert refused.hdr("Allow") and "REFER" not in refused.hdr("Allow"), refused  # 405 says what is allowed
    # out of any dialog too (new requests other than INVITE were never relayed)
    cid = uuid.uuid4().hex
    stray = caller.transact(kam.port, "REFER", f"sip:1001@127.0.0.1:{kam.port}", [
        caller._from(), f"To: <sip:1001@127.0.0.1:{kam.port}>", f"Call-ID: {cid}", "CSeq: 1 REFER",
        "Refer-To: <sip:+19005550100@127.0.0.1:5099>"])
    assert stray is not None and stray.status in (403, 405), stray
    assert [m.method for m in nothing_more(agent.requests)] == ["INVITE", "ACK"]  # no REFER reached it

    # the agent's own REFER towards the caller passes (it comes from the farm)
    accepted = agent.refer_caller(kam, inv)
    assert accepted is not None and accepted.status == 202, (accepted, kam.log_tail())
    assert [m.method for m in caller.requests()] == ["REFER"]
    bye = caller.request(kam, "BYE")
    assert bye is not None and bye.status == 200, bye
    assert [m.method for m in agent.requests()] == ["INVITE", "ACK", "BYE"]


# -- the allow-list -------------------------------------------------------------------------------------
def test_only_sources_in_the_address_list_reach_the_agents(front, peers):
    """Address list: one caller port of 127.0.0.1 and 10.0.0.0/8. Any other source gets 403 for
    an INVITE, an OPTIONS and a forged in-dialog BYE, and nothing reaches the agent; the listed
    caller's call goes through as before, and so do the agent's own requests (its BYE), although
    the agent is in no address list."""
    agent = peers(StandInAgent, "agent")
    listed, stranger = peers(name="listed"), peers(name="stranger")
    kam = front(agent, f"# the carrier's SBC: one port of 127.0.0.1\n1 127.0.0.1 32 {listed.port} carrier-sbc\n"
                       "1 10.0.0.0 8 0 private-sbcs\n")

    refused = stranger.invite(kam)
    assert refused is not None and refused.status == 403, (refused, kam.log_tail())
    assert refused.first == "SIP/2.0 403 Forbidden"
    branch = stranger.options(kam)
    ping = poll(lambda: stranger.responses(branch), bool, 5)
    assert [m.status for m in ping] == [403], ping
    assert nothing_more(agent.requests) == []  # the agent saw none of it

    # the listed caller: the call goes through (INVITE, ACK relayed; the keepalive answered)
    answer = listed.invite(kam)
    assert answer is not None and answer.status == 200, (answer, kam.log_tail())
    branch = listed.options(kam)
    assert [m.first for m in poll(lambda: listed.responses(branch), bool, 5)] == ["SIP/2.0 200 Keepalive"]
    assert [m.method for m in poll(agent.requests, lambda r: len(r) >= 2, 5)] == ["INVITE", "ACK"]
    # a stranger forging an in-dialog request of that call (the route set is no secret): 403
    stranger.call_id, stranger.dialog, stranger.tag = listed.call_id, dict(listed.dialog), listed.tag
    forged = stranger.request(kam, "BYE")
    assert forged is not None and forged.status == 403, forged
    assert [m.method for m in nothing_more(agent.requests)] == ["INVITE", "ACK"]
    # the agent hangs up: its BYE (from the farm, in no address list) reaches the caller
    (inv,) = agent.invites()
    contact = re.search(r"<([^>]+)>", inv.hdr("Contact")).group(1)
    bye = agent.transact(kam.port, "BYE", contact, [
        *(f"Route: {rr}" for rr in inv.all("Record-Route")), f"From: {inv.hdr('To')};tag={agent.tag}",
        f"To: {inv.hdr('From')}", f"Call-ID: {inv.hdr('Call-ID')}", "CSeq: 2 BYE"])
    assert bye is not None and bye.status == 200, (bye, kam.log_tail())
    assert [m.method for m in listed.requests()] == ["BYE"]


# -- flood protection ---------------------------------------------------------------------------------------
PIKE_DENSITY = 300  # the shipped config's requests per source per 2 s unit
BURST = 2400  # in about 1.2 s: many times the limit (and over the 3 x density a new address may take)


def _keepalives(caller: Caller, kam: Kamailio, n: int, per_s: float) -> list[str]:
    """`n` keepalive OPTIONS at `per_s` a second (paced on the clock); their branches."""
    t0, out = time.monotonic(), []
    for i in range(n):
        out.append(caller.options(kam))
        delay = t0 + (i + 1) / per_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing the sender, not waiting for a result
    return out


def _answered(caller: Caller, branches: list[str]) -> list[bool]:
    got = {m.branch for m in caller.messages() if m.status is not None}
    return [b in got for b in branches]


def test_a_flooding_source_is_dropped_while_a_normal_rate_passes(front, peers):
    """pike: 40 keepalives at 20 a second all get their 200; a burst of 2400 in ~1.2 s (from the
    same caller) is answered only up to the limit, its tail dropped without any reply (no 503);
    meanwhile the agent's own requests and the probe are untouched; once the source is quiet for
    a unit it is let through again and a normal rate passes as before."""
    agent = peers(StandInAgent, "agent")
    caller = peers()
    kam = front(agent)

    normal = _keepalives(caller, kam, 40, 20)
    assert all(poll(lambda: _answered(caller, normal), all, 5)), kam.log_tail()

    burst = _keepalives(caller, kam, BURST, 2000)
    answered = poll(lambda: _answered(caller, burst), lambda a: False, 1.5)  # all the replies that will come
    n = sum(answered)
    statuses = {m.status for m in caller.messages() if m.status is not None}
    assert statuses == {200}, statuses  # dropped silently: no 503, no 403
    assert PIKE_DENSITY <= n <= 4 * PIKE_DENSITY, (n, kam.log_tail())  # blocked at the limit, not before
    assert not any(answered[BURST // 2:]), "the burst's second half should be dropped"
    assert "PIKE - BLOCKing ip 127.0.0.1" in kam.log()

    # the farm meanwhile: the agent's own requests pass (not counted), the probe keeps it in rotation
    branch = agent.send(kam.port, "OPTIONS", f"sip:127.0.0.1:{kam.port}", [
        f"From: <sip:agent@127.0.0.1:{agent.port}>;tag={agent.tag}", f"To: <sip:127.0.0.1:{kam.port}>",
        f"Call-ID: {uuid.uuid4().hex}", "CSeq: 1 OPTIONS"])
    assert [m.status for m in poll(lambda: agent.responses(branch), bool, 3)] == [200]
    assert kam.states()[agent.sip_uri].startswith("A")

    # quiet for a unit: unblocked (bounded: a keepalive every 0.5 s, for at most 12 s)
    def unblocked() -> bool:
        b = caller.options(kam)
        return bool(poll(lambda: caller.responses(b), bool, 0.5, step=0.05))
    assert poll(unblocked, bool, 12, step=0), kam.log_tail()
    again = _keepalives(caller, kam, 40, 20)
    assert all(poll(lambda: _answered(caller, again), all, 5)), kam.log_tail()
    print(f"\npike: {n} of a {BURST}-request burst answered, the rest dropped; normal rate passes before "
          "and after")


def test_the_shipped_address_list_loads_and_a_carrier_is_added_live(front, peers):
    """deploy/kamailio/address.list as shipped (its example group: 10.0.0.0/8) loads and lets no
    loopback caller in (403); adding the caller's line and reloading as the file says (kamcmd
    permissions.addressReload) lets it call without a restart."""
    agent = peers(StandInAgent, "agent")
    caller = peers(name="new-carrier")
    shipped = (ROOT / "deploy" / "kamailio" / "address.list").read_text()
    kam = front(agent, shipped)
    branch = caller.options(kam)
    assert [m.status for m in poll(lambda: caller.responses(branch), bool, 5)] == [403], kam.log_tail()
    assert "10.0.0.0" in kam.rpc("permissions.subnetDump")
    kam.addresses.write_text(shipped + f"1 127.0.0.1 32 {caller.port} new-carrier\n")
    reload = kam.rpc("permissions.addressReload")
    assert "error" not in reload.lower(), reload
    assert f"{caller.port}" in kam.rpc("permissions.addressDump")
    answer = caller.invite(kam)
    assert answer is not None and answer.status == 200, (answer, kam.log_tail())
    assert [m.method for m in poll(agent.requests, lambda r: len(r) >= 2, 5)] == ["INVITE", "ACK"]
