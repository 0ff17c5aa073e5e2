"""Running the real server as a subprocess for end-to-end tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from tests.support import ROOT, free_port, poll



def http_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


class ServerProcess:
    def __init__(self, tmp: Path, cache: Path, overrides: dict | None = None, env: dict[str, str] | None = None):
        self.port = free_port()
        self.sip_port = free_port(socket.SOCK_DGRAM)
        cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
        cfg["http"]["port"] = self.port
        cfg["sip"]["port"] = self.sip_port
        cfg["sip"]["enabled"] = False
        cfg["logging"] = {"format": "json", "level": "info"}
        personas = tmp / "personas"
        if not personas.exists():
            shutil.copytree(ROOT / "personas", personas)
        cfg["personas"]["dir"] = str(personas)
        for section, values in (overrides or {}).items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        self.config = tmp / "server.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "server.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        env = dict(os.environ, PERSONAPLEX_CACHE=str(cache), NO_TORCH_COMPILE="1", **(env or {}))
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--config", str(self.config)],
                                     cwd=tmp, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                status, body = http_json(self.url + "/readyz", timeout=1)
                if status == 200:
                    return body
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(self.log_path.read_text()[-3000:])

    def lines(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self, sig=signal.SIGTERM, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def wait_caller_heard(srv: "ServerProcess", timeout: float = 15.0) -> dict:
    """The only call in progress, once the server has received the caller's audio (or the
    timeout passed: the caller's assertions then say what was missing)."""
    def only_call():
        (call,) = http_json(srv.url + "/api/calls")[1]["calls"]
        return call
    return poll(only_call, lambda c: c["frames_in"] > 10 and c["caller_peak"] > 0.05, timeout)


def wait_capacity(srv: "ServerProcess", capacity_left: int, timeout: float = 10.0) -> dict:
    """/readyz once it reports `capacity_left` free slots (or the timeout passed)."""
    status_ready = poll(lambda: http_json(srv.url + "/readyz"),
                        lambda r: r[0] == 200 and r[1]["capacity_left"] == capacity_left, timeout)
    return status_ready[1]
