"""Running sipp scenarios (Debian's sip-tester) against a server on loopback."""

from __future__ import annotations

import re
import socket
import time
import uuid
from pathlib import Path

from tests.support.sip_trace import sipp as run_sipp  # noqa: F401  (one sipp runner: sip_trace.Sipp)

SCENARIOS = Path(__file__).resolve().parents[1] / "e2e" / "sipp"


def raw_sip(sip_port: int, text: str, timeout: float = 2.0) -> str | None:
    """Send one SIP message over UDP from a fresh port ("PORT" in `text` becomes it); the first
    line of the answer, or None when none came (dropped as junk)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    try:
        s.sendto(text.replace("PORT", str(port)).encode("latin-1", "replace"), ("127.0.0.1", sip_port))
        return s.recvfrom(65535)[0].decode(errors="replace").split("\r\n")[0]
    except (socket.timeout, OSError):
        return None
    finally:
        s.close()


def raw_sip_final(sip_port: int, text: str, timeout: float = 2.0) -> str | None:
    """Like `raw_sip`, but the first line of the *final* answer (>= 200), reading past 100
    Trying; None when no final answer came within `timeout` (dropped, or only provisional)."""
    import time

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    deadline = time.monotonic() + timeout
    try:
        s.sendto(text.replace("PORT", str(port)).encode("latin-1", "replace"), ("127.0.0.1", sip_port))
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            first = s.recvfrom(65535)[0].decode(errors="replace").split("\r\n")[0]
            parts = first.split(" ")
            if len(parts) > 1 and parts[1].isdigit() and int(parts[1]) >= 200:
                return first
        return None
    except (socket.timeout, OSError):
        return None
    finally:
        s.close()


def invite(headers: list[str], body: str = "", number: str = "1001", content_length: str | None = None) -> str:
    """An INVITE to `number`; "-Name" in `headers` drops a default header, others are added."""
    return request("INVITE", headers, body, number, content_length)


def request(method: str, headers: list[str] | None = None, body: str = "", number: str = "1001",
            content_length: str | None = None) -> str:
    """An out-of-dialog `method` request to `number` (no To tag), for `raw_sip`; "-Name" in
    `headers` drops a default header, others are added."""
    headers = headers or []
    cid = uuid.uuid4().hex
    base = [f"Via: SIP/2.0/UDP 127.0.0.1:PORT;branch=z9hG4bK{cid[:12]}", "From: <sip:x@127.0.0.1:PORT>;tag=t1",
            f"To: <sip:{number}@127.0.0.1>", f"Call-ID: {cid}", f"CSeq: 1 {method}",
            "Contact: <sip:x@127.0.0.1:PORT>", "Max-Forwards: 70"]
    drop = {h.split(":")[0][1:] for h in headers if h.startswith("-")}
    lines = [h for h in base if h.split(":")[0] not in drop] + [h for h in headers if not h.startswith("-")]
    length = content_length if content_length is not None else str(len(body))
    return (f"{method} sip:{number}@127.0.0.1 SIP/2.0\r\n" + "\r\n".join(lines) +
            f"\r\nContent-Length: {length}\r\n\r\n" + body)


def sdp(codecs: str = "0", rtpmap: str = "a=rtpmap:0 PCMU/8000", extra: str = "") -> str:
    return ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio 40000 RTP/AVP {codecs}\r\n{rtpmap}\r\n{extra}")


class Trap:
    """A loopback address nobody should ever contact (a "premium number" in a Refer-To): UDP and
    TCP bound on one port. `received()` says what reached it so far (datagrams, connections)."""

    def __init__(self):
        for _ in range(20):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:  # that port is taken for TCP: another pair
                self.udp.close()
                self.tcp.close()
        else:
            raise RuntimeError("no port free for both UDP and TCP")
        self.tcp.listen(4)
        self.udp.setblocking(False)
        self.tcp.setblocking(False)
        self.got: list[str] = []

    def received(self) -> list[str]:
        while True:
            try:
                self.got.append(self.udp.recv(65535).decode(errors="replace").split("\r\n")[0])
            except (BlockingIOError, OSError):
                break
        while True:
            try:
                conn, _ = self.tcp.accept()
            except (BlockingIOError, OSError):
                break
            self.got.append("TCP connection")
            conn.close()
        return list(self.got)

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


class UdpDialog:
    """One INVITE transaction and its dialog spoken by hand over UDP (a late-offer INVITE is what
    pjsua and sipp callers never send): the final answer, then the ACK and BYE that complete it."""

    def __init__(self, sip_port: int):
        self.sip_port = sip_port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.call_id = uuid.uuid4().hex
        self.branch = "z9hG4bK" + uuid.uuid4().hex[:12]
        self.received: list[tuple[float, str]] = []  # (wall clock, first line) of every answer

    def send(self, text: str) -> None:
        self.sock.sendto(text.replace("PORT", str(self.port)).encode("latin-1", "replace"),
                         ("127.0.0.1", self.sip_port))

    def final(self, cseq: str, timeout: float = 5.0) -> str | None:
        """The first final response (>= 200) to `cseq`, or None within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                msg = self.sock.recvfrom(65535)[0].decode(errors="replace")
            except socket.timeout:
                return None
            self.received.append((time.time(), msg.split("\r\n", 1)[0]))
            m = re.match(r"SIP/2\.0 (\d{3})", msg)
            if m and int(m.group(1)) >= 200 and re.search(rf"^CSeq:\s*{cseq}\s*$", msg, re.M | re.I):
                return msg
        return None

    def invite(self, number: str, ctype: str, body: str = "") -> str:
        """An INVITE with this dialog's Call-ID and branch (no body: a late offer)."""
        text = invite([f"Content-Type: {ctype}"], body, number=number)
        text = re.sub(r"^Call-ID: .*$", f"Call-ID: {self.call_id}", text, flags=re.M)
        return re.sub(r"branch=z9hG4bK\w+", f"branch={self.branch}", text)

    def in_dialog(self, method: str, cseq: int, answer: str, branch: str, body: str = "") -> str:
        """A request in the dialog `answer` (a final response to the INVITE) set up."""
        to = re.search(r"^To:\s*(.*?)\s*$", answer, re.M | re.I).group(1)
        target = re.search(r"^Contact:\s*<([^>]+)>", answer, re.M | re.I)
        uri = target.group(1) if target else f"sip:1001@127.0.0.1:{self.sip_port}"
        head = [f"{method} {uri} SIP/2.0", f"Via: SIP/2.0/UDP 127.0.0.1:PORT;branch={branch}",
                "From: <sip:x@127.0.0.1:PORT>;tag=t1", f"To: {to}", f"Call-ID: {self.call_id}",
                f"CSeq: {cseq} {method}", "Max-Forwards: 70"]
        if body:
            head.append("Content-Type: application/sdp")
        return "\r\n".join(head) + f"\r\nContent-Length: {len(body)}\r\n\r\n" + body

    def close(self) -> None:
        self.sock.close()
