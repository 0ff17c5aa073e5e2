"""sipp on loopback, and reading what happened on the wire: sipp's message trace
(`-trace_msg`) as a list of messages with their times, and the server's log times, on one clock.

sipp writes each message after a line of dashes and its local wall-clock time, then
"UDP message sent (N bytes):" or "TCP message received [N] bytes :". The server logs ISO UTC
times. Both become seconds since the epoch, so a test can order what sipp saw against what the
server did (same machine, same clock).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tests.support import free_port

_SEP = re.compile(r"^-{20,} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\s*$", re.M)
_KIND = re.compile(r"^(\w+) message (sent|received)")


@dataclass(frozen=True)
class SipMessage:
    t: float  # seconds since the epoch
    sent: bool  # sipp sent it (False: sipp received it)
    transport: str  # "UDP", "TCP", "TLS"
    text: str

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    @property
    def status(self) -> int | None:
        """The status code of a response, None for a request."""
        m = re.match(r"SIP/2\.0 (\d{3})", self.first_line)
        return int(m.group(1)) if m else None

    @property
    def method(self) -> str | None:
        """The method of a request, None for a response."""
        return None if self.status is not None else self.first_line.split(" ", 1)[0]

    def header(self, name: str) -> str | None:
        m = re.search(rf"^{re.escape(name)}\s*:\s*(.*?)\s*$", self.head, re.M | re.I)
        return m.group(1) if m else None

    @property
    def cseq(self) -> tuple[int, str] | None:
        value = self.header("CSeq")
        if not value:
            return None
        n, method = value.split()
        return int(n), method

    @property
    def head(self) -> str:
        return re.split(r"\n\s*\n", self.text, maxsplit=1)[0]

    @property
    def body(self) -> str:
        parts = re.split(r"\n\s*\n", self.text, maxsplit=1)
        return parts[1] if len(parts) > 1 else ""

    def is_response(self, status: int, cseq: int | None = None, method: str = "INVITE") -> bool:
        c = self.cseq
        return self.status == status and c is not None and c[1] == method and (cseq is None or c[0] == cseq)


def parse_trace(text: str) -> list[SipMessage]:
    """sipp's `-trace_msg` file as messages, in the order sipp logged them."""
    out: list[SipMessage] = []
    marks = list(_SEP.finditer(text))
    for i, m in enumerate(marks):
        chunk = text[m.end():marks[i + 1].start() if i + 1 < len(marks) else len(text)].strip("\n")
        kind_line, _, rest = chunk.partition("\n")
        k = _KIND.match(kind_line.strip())
        if k is None:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()  # local time, as sipp writes
        out.append(SipMessage(t, k.group(2) == "sent", k.group(1).upper(), rest.strip("\n").replace("\r", "")))
    return out


def log_time(line: dict) -> float:
    """A server log line's time (ISO UTC) as seconds since the epoch."""
    return datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


def sdp_direction(sdp: str) -> str:
    """The audio stream's direction attribute in an SDP body (RFC 4566: sendrecv when absent)."""
    for attr in ("sendonly", "recvonly", "inactive", "sendrecv"):
        if re.search(rf"^a={attr}\s*$", sdp, re.M):
            return attr
    return "sendrecv"


# -- running sipp ------------------------------------------------------------------------------------
def _media_port() -> int:
    """A UDP port whose next three are free too: sipp binds audio RTP/RTCP and video RTP/RTCP
    at -mp .. -mp+3."""
    for _ in range(50):
        base = free_port(socket.SOCK_DGRAM)
        socks = []
        try:
            for k in range(4):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    return free_port(socket.SOCK_DGRAM)


class Sipp:
    """One sipp user agent against `127.0.0.1:port` playing `scenario` (with text replacements)
    `calls` times, all at once; `start()` runs it in the background, `wait()` returns (exit
    status, message trace) and sets `elapsed`. Ports are chosen free and a start that loses a
    port race (sipp: "Unable to bind") is retried with new ports: another process on a shared
    machine, not the server, took the port."""

    def __init__(self, port: int, scenario: Path, service: str, tmp: Path, replace: dict | None = None,
                 timeout: int = 30, extra: list[str] | None = None, calls: int = 1):
        text = Path(scenario).read_text()
        for k, v in (replace or {}).items():
            text = text.replace(k, v)
        self.tmp, self.timeout = tmp, timeout
        self.sf = tmp / f"{Path(scenario).stem}-{uuid.uuid4().hex[:6]}.xml"
        self.sf.write_text(text)
        self.port, self.service, self.extra, self.calls = port, service, list(extra or []), calls
        self.proc: subprocess.Popen | None = None
        self.output = ""
        self.started = self.elapsed = 0.0

    def _cmd(self) -> list[str]:
        return [shutil.which("sipp") or "sipp", f"127.0.0.1:{self.port}", "-sf", str(self.sf), "-s", self.service,
                "-m", str(self.calls), "-l", str(self.calls), "-r", "50", "-rp", "1000", "-i", "127.0.0.1",
                "-p", str(free_port(socket.SOCK_DGRAM)), "-mp", str(_media_port()),
                "-timeout", f"{self.timeout}s", "-timeout_error", "-nostdin", "-trace_err", "-trace_msg",
                *self.extra]

    def start(self) -> "Sipp":
        if not self.started:
            self.started = time.monotonic()
        self.proc = subprocess.Popen(self._cmd(), cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        return self

    def wait(self) -> tuple[int, str]:
        for attempt in range(3):
            assert self.proc is not None
            try:
                self.output, _ = self.proc.communicate(timeout=self.timeout + 15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.output, _ = self.proc.communicate()
            if "Unable to bind" not in self.output or attempt == 2:
                break
            for old in self.tmp.glob(f"{self.sf.stem}_*"):
                old.unlink()
            self.start()
        self.elapsed = time.monotonic() - self.started
        return self.proc.returncode, self.trace_text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def trace_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob(f"{self.sf.stem}_*messages.log")))

    @property
    def trace(self) -> list[SipMessage]:
        return parse_trace(self.trace_text())


def sipp(port: int, scenario: Path, service: str, tmp: Path, replace: dict | None = None, timeout: int = 30,
         extra: list[str] | None = None) -> tuple[int, str]:
    """One call of `scenario` to `service`@127.0.0.1:`port`: (sipp's exit status, message trace)."""
    return Sipp(port, scenario, service, tmp, replace, timeout, extra).start().wait()


def sip_options(port: int, uri: str) -> str:
    """The status line the SIP server on 127.0.0.1:`port` answers an out-of-dialog OPTIONS for
    `uri` with, as a proxy's health probe sends it ("" when nothing answers within 3 s)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.bind(("127.0.0.1", 0))
    here, cid = s.getsockname()[1], uuid.uuid4().hex
    msg = (f"OPTIONS {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{here};branch=z9hG4bK{cid[:16]}\r\n"
           f"From: <sip:probe@127.0.0.1:{here}>;tag={cid[:8]}\r\nTo: <{uri}>\r\nCall-ID: {cid}\r\n"
           "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    try:
        s.sendto(msg.encode(), ("127.0.0.1", port))
        return s.recvfrom(65535)[0].decode(errors="replace").split("\r\n")[0]
    except OSError:
        return ""
    finally:
        s.close()
