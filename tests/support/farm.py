"""The farm's proxies run from their shipped configs in deploy/, on loopback: a `Daemon` (its
output in a log file, stopped politely) and `Kamailio` (deploy/kamailio/kamailio.cfg, its
addresses, dispatcher list and address list given with -A). Shared by tests/e2e/test_scale_out.py
(real agents) and tests/e2e/test_kamailio_security.py (stand-in agents).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support import ROOT, free_port, poll, require

KAMAILIO_CFG = ROOT / "deploy" / "kamailio" / "kamailio.cfg"
#: The address list a test farm runs with unless told otherwise: every port of 127.0.0.1 (the
#: callers of the tests) may send requests through the proxy.
LOOPBACK_ALLOWED = "1 127.0.0.1 32 0 loopback-callers\n"


class Daemon:
    """A proxy started from its shipped config, its output in a log file; stopped politely, and
    checked when stopped: its exit status and its log's error lines (`ERRORS`), less the ones a
    test provokes on purpose (`allow`)."""

    proc: subprocess.Popen
    log_path: Path
    #: what a polite stop sends, and the exit status it must give
    STOP_SIGNAL = signal.SIGTERM
    #: a log line at error level or worse
    ERRORS = re.compile(r"ERROR|CRITICAL|ALERT|BUG")

    def _spawn(self, cmd: list[str], env: dict | None = None) -> None:
        self.allowed: list[re.Pattern] = []
        self.stopped: int | None = None
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def allow(self, *patterns: str) -> None:
        """Error lines matching these are expected (the test provoked them)."""
        self.allowed += [re.compile(p) for p in patterns]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 3000) -> str:
        return self.log()[-n:]

    def error_lines(self) -> list[str]:
        return [ln for ln in self.log().splitlines()
                if self.ERRORS.search(ln) and not any(p.search(ln) for p in self.allowed)]

    def stop(self) -> int:
        """Stop politely and check: exit status 0 (a crash, or a kill after the polite signal
        was ignored, fails the test) and no unexpected error line. Checked once."""
        if self.stopped is not None:
            return self.stopped
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(self.STOP_SIGNAL)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                killed = True
        self._log.close()
        rc = self.stopped = self.proc.returncode
        name = type(self).__name__
        assert not killed, f"{name} ignored {self.STOP_SIGNAL.name} and was killed:\n{self.log_tail()}"
        assert rc == 0, f"{name} exited {rc}:\n{self.log_tail()}"
        bad = self.error_lines()
        assert not bad, f"{name} logged {len(bad)} unexpected error line(s):\n" + "\n".join(bad[:10])
        return rc


class Kamailio(Daemon):
    """deploy/kamailio/kamailio.cfg as shipped, its addresses set with -A; the agents (anything
    with `name` and `sip_uri`) in a dispatcher.list written in the shipped template's format,
    each with `maxload`; the allowed sources in an address.list in the shipped one's format
    (`addresses`: its text, all of 127.0.0.1 by default); `defines`: more -A NAME=VALUE."""

    def __init__(self, tmp: Path, agents: list, maxload: int, addresses: str = LOOPBACK_ALLOWED,
                 defines: dict[str, str] | None = None):
        require("kamailio")
        self.dir = tmp
        self.dir.mkdir(parents=True, exist_ok=True)
        self.list = self.dir / "dispatcher.list"
        self.list.write_text("".join(f"1 {a.sip_uri} 0 0 duid={a.name};maxload={maxload}\n" for a in agents))
        self.addresses = self.dir / "address.list"
        self.addresses.write_text(addresses)
        self.port = free_port(socket.SOCK_DGRAM)
        self.ctl = f"unix:{self.dir}/kamailio_ctl"
        self.log_path = self.dir / "kamailio.log"
        extra = [arg for k, v in (defines or {}).items() for arg in ("-A", f"{k}={v}")]
        self._spawn(
            ["kamailio", "-DD", "-E", "-f", str(KAMAILIO_CFG), "-Y", str(self.dir), "-m", "64", "-M", "8",
             "-A", "SIP_ADDR=127.0.0.1", "-A", f"SIP_PORT={self.port}", "-A", f'DS_LIST="{self.list}"',
             "-A", f'ADDR_LIST="{self.addresses}"', "-A", f'CTL_SOCK="{self.ctl}"', *extra])
        # at SIGTERM the TCP workers exit before the main process reads their sockets back: Kamailio
        # reports each as CRITICAL although nothing is lost (the process is going away)
        self.allow(r"receive_fd\(\): EOF on \d+$")

    def rpc(self, *args: str) -> str:
        res = subprocess.run(["kamcmd", "-s", self.ctl, *args], capture_output=True, text=True, timeout=5)
        return res.stdout + res.stderr

    def states(self) -> dict[str, str]:
        """Destination URI -> dispatcher flags (AP: active and probed; IP: out of rotation)."""
        try:
            out = self.rpc("dispatcher.list")
        except subprocess.TimeoutExpired:
            return {}
        return dict(re.findall(r"URI: (\S+)\s+FLAGS: (\w+)", out))

    def wait_state(self, uri: str, state: str, timeout: float) -> float | None:
        """Seconds until `uri` is in `state` ("A" active, "I" inactive), or None."""
        t0 = time.monotonic()
        got = poll(lambda: self.states().get(uri, ""), lambda s: s.startswith(state), timeout, step=0.1)
        return time.monotonic() - t0 if got.startswith(state) else None

    def wait_all_active(self, agents: list, timeout: float = 15) -> None:
        want = {a.sip_uri for a in agents}
        states = poll(self.states, lambda s: all(s.get(u, "").startswith("A") for u in want), timeout, step=0.1)
        assert all(states.get(u, "").startswith("A") for u in want), (states, self.log_tail())
