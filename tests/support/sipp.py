"""Running sipp scenarios (Debian's sip-tester) against a server on loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from pathlib import Path

from tests.support import free_port

SCENARIOS = Path(__file__).resolve().parents[1] / "e2e" / "sipp"


def run_sipp(sip_port: int, scenario: Path, service: str, tmp: Path, replace: dict | None = None,
             timeout: int = 30, extra: list[str] | None = None) -> tuple[int, str]:
    """One call of `scenario` to `service`@127.0.0.1:`sip_port` (text replacements applied first);
    returns sipp's exit status and its message trace."""
    text = scenario.read_text()
    for k, v in (replace or {}).items():
        text = text.replace(k, v)
    sf = tmp / f"{scenario.stem}-{uuid.uuid4().hex[:6]}.xml"
    sf.write_text(text)
    cmd = [shutil.which("sipp") or "sipp", f"127.0.0.1:{sip_port}", "-sf", str(sf), "-s", service, "-m", "1",
           "-i", "127.0.0.1", "-p", str(free_port(socket.SOCK_DGRAM)), "-mp", str(free_port(socket.SOCK_DGRAM)),
           "-timeout", f"{timeout}s", "-timeout_error", "-nostdin", "-trace_err", "-trace_msg", *(extra or [])]
    res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=timeout + 15)
    msgs = "".join(p.read_text(errors="replace") for p in tmp.glob(f"{sf.stem}*messages.log"))
    return res.returncode, msgs
