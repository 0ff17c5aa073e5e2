"""Running sipp scenarios (Debian's sip-tester) against a server on loopback."""

from __future__ import annotations

import socket
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


def invite(headers: list[str], body: str = "", number: str = "1001", content_length: str | None = None) -> str:
    """An INVITE to `number`; "-Name" in `headers` drops a default header, others are added."""
    cid = uuid.uuid4().hex
    base = [f"Via: SIP/2.0/UDP 127.0.0.1:PORT;branch=z9hG4bK{cid[:12]}", "From: <sip:x@127.0.0.1:PORT>;tag=t1",
            f"To: <sip:{number}@127.0.0.1>", f"Call-ID: {cid}", "CSeq: 1 INVITE", "Contact: <sip:x@127.0.0.1:PORT>",
            "Max-Forwards: 70"]
    drop = {h.split(":")[0][1:] for h in headers if h.startswith("-")}
    lines = [h for h in base if h.split(":")[0] not in drop] + [h for h in headers if not h.startswith("-")]
    length = content_length if content_length is not None else str(len(body))
    return (f"INVITE sip:{number}@127.0.0.1 SIP/2.0\r\n" + "\r\n".join(lines) +
            f"\r\nContent-Length: {length}\r\n\r\n" + body)


def sdp(codecs: str = "0", rtpmap: str = "a=rtpmap:0 PCMU/8000", extra: str = "") -> str:
    return ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio 40000 RTP/AVP {codecs}\r\n{rtpmap}\r\n{extra}")
