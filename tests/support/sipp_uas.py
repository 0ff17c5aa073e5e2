"""A sipp callee (UAS) on loopback for calls the agent places: it listens before the agent dials.

`SippCallee(scenario, tmp, replace)` starts sipp in server mode on a free UDP port and returns
once that port is bound (the agent's INVITE cannot arrive before sipp listens); `uri` is what
the test dials; `wait()` gives (exit status, message trace) like `tests.support.sip_trace.Sipp`.
`TalkingTap` is the callee's media: it records the agent's RTP and says a wav back.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from tests.support import free_port
from tests.support.rtp_tap import RtpTap, _mulaw
from tests.support.sip_trace import SipMessage, _media_port, parse_trace


def _bound(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


class SippCallee:
    def __init__(self, scenario: Path, tmp: Path, replace: dict | None = None, timeout: int = 60,
                 user: str = "callee", calls: int = 1):
        """`calls`: how many calls it takes before it exits (a campaign dials a number again)."""
        text = Path(scenario).read_text()
        for k, v in (replace or {}).items():
            text = text.replace(k, v)
        self.tmp, self.timeout = tmp, timeout
        self.sf = tmp / f"{Path(scenario).stem}-{uuid.uuid4().hex[:6]}.xml"
        self.sf.write_text(text)
        self.output = ""
        for _ in range(5):  # a port another process takes between the probe and sipp's bind: again
            self.port = free_port(socket.SOCK_DGRAM)
            self.media_port = _media_port()
            self.proc = subprocess.Popen(
                [shutil.which("sipp") or "sipp", "-sf", str(self.sf), "-i", "127.0.0.1", "-p", str(self.port),
                 "-mp", str(self.media_port), "-m", str(calls), "-timeout", f"{timeout}s", "-timeout_error", "-nostdin",
                 "-trace_err", "-trace_msg"], cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None and not _bound(self.port):
                time.sleep(0.02)
            if self.proc.poll() is None and _bound(self.port):
                break
            self.kill()
        else:
            raise RuntimeError(f"sipp callee did not start: {self.output[-2000:]}")
        self.uri = f"sip:{user}@127.0.0.1:{self.port}"

    def wait(self, timeout: float | None = None) -> tuple[int, str]:
        try:
            self.output, _ = self.proc.communicate(timeout=timeout or self.timeout + 15)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode, self.trace_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.output += self.proc.communicate(timeout=5)[0] or ""
        except (ValueError, OSError, subprocess.TimeoutExpired):
            pass

    def trace_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob(f"{self.sf.stem}_*messages.log")))

    @property
    def trace(self) -> list[SipMessage]:
        return parse_trace(self.trace_text())


class TalkingTap(RtpTap):
    """An RtpTap that also talks: from the first agent packet on, it sends `ulaw` (raw G.711
    μ-law, 8 kHz) back to where that packet came from, 20 ms a packet, from its own port.

    The callee's audio must come from the port its SDP named: pjmedia latches its sending to the
    source of the RTP it receives (symmetric RTP), so audio sent from another port (sipp's
    `rtp_stream`) would take the agent's RTP away from the tap."""

    def __init__(self, ulaw: bytes):
        self._ulaw = ulaw
        self._talking = False
        super().__init__()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, src = self.sock.recvfrom(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            t = time.time()
            if len(data) < 12 or data[0] >> 6 != 2:
                continue
            pt = data[1] & 0x7F
            header = 12 + 4 * (data[0] & 0x0F)
            peak = float(np.abs(_mulaw(data[header:])).max()) if pt == 0 and len(data) > header else 0.0
            self.packets.append((t, pt, peak))
            if not self._talking:
                self._talking = True
                threading.Thread(target=self._talk, args=(src,), name="rtp-talk", daemon=True).start()

    def _talk(self, dest) -> None:
        ssrc, seq, ts = 0x1234ABCD, 1, 0
        start = time.monotonic()
        for i, off in enumerate(range(0, len(self._ulaw) - 159, 160)):
            if self._stop.is_set():
                return
            head = struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc)
            try:
                self.sock.sendto(head + self._ulaw[off:off + 160], dest)
            except OSError:
                return
            seq, ts = seq + 1, ts + 160
            time.sleep(max(0.0, start + (i + 1) * 0.02 - time.monotonic()))
