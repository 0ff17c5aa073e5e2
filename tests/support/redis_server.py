"""A real redis-server for a test: on 127.0.0.1, nothing written to disk, stopped and started
again on the same port (a farm's shared used-token store going down and coming back)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from tests.support import poll, require, stable_port

def require_redis_server() -> str:
    """The redis-server binary (a missing one fails the test, never skips: `require`)."""
    require("redis-server")
    return shutil.which("redis-server")


def _ping(port: int, password: str | None) -> bool:
    """One PING on a fresh socket: True on +PONG (or, with a password, -NOAUTH: it is up)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = s.recv(64)
    except OSError:
        return False
    return reply.startswith(b"+PONG") or (password is not None and reply.startswith(b"-NOAUTH"))


class RedisServer:
    """`redis-server --port P --bind 127.0.0.1 --save '' --appendonly no` (plus `--requirepass`
    when `password` is given); `start()` waits (bounded) for it to answer PING."""

    def __init__(self, tmp: Path, password: str | None = None, port: int | None = None):
        self.binary = require_redis_server()
        # below the ephemeral range: while it is down, no client's bind(0) can take the port
        self.port = port or stable_port()
        self.password = password
        self.dir = tmp
        self.log_path = tmp / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0, password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"redis://{':' + pw + '@' if pw else ''}127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.log_path)]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        up = poll(lambda: self.proc.poll() is None and _ping(self.port, self.password), bool, timeout, step=0.05)
        if not up:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
            self.stop()
            log = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"redis-server on 127.0.0.1:{self.port} did not answer PING in {timeout} s:"
                               f" {err}{log}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it (SIGTERM, then SIGKILL) and wait until the port no longer answers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        assert not poll(lambda: _ping(self.port, self.password), lambda up: not up, timeout, step=0.05), \
            f"127.0.0.1:{self.port} still answers after redis-server stopped"

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
