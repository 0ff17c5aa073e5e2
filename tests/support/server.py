"""Running the real server as a subprocess for end-to-end tests."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from tests.support import ROOT, poll, stable_port


TEST_TWILIO_TOKEN = "test-twilio-auth-token-0123456789"
TEST_TELNYX_TOKEN = "test-telnyx-stream-token-0123456789"


def http_json(url: str, timeout: float = 5.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def scrape(srv: "ServerProcess") -> dict[str, float]:
    """Every sample of the server's /metrics as {`name{labels}` exactly as exposed: value}."""
    out = {}
    for line in http_text(srv.ops_url + "/metrics").splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def metric(srv: "ServerProcess", sample: str) -> float:
    """The value of one Prometheus sample (`name{labels}` exactly as exposed), 0 when absent:
    tests compare values before and after what they do, so they do not depend on what ran
    before them on the same server."""
    return scrape(srv).get(sample, 0.0)


#: Environment a test server must not inherit: with them, `model.source: auto` (the demo config)
#: would fetch or load the 7B PersonaPlex weights of whoever runs the tests (the README tells
#: users to export HF_TOKEN).
HUB_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")


def server_env(cache: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test server process: this one's, minus the Hugging Face settings
    (HUB_ENV), with the demo-model cache, no torch.compile and this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in HUB_ENV}
    if cache is not None:
        env["PERSONAPLEX_CACHE"] = str(cache)
    env.update(NO_TORCH_COMPILE="1", PYTHONPATH=str(ROOT))
    env.update(extra or {})
    return env


def pinned_model(cache: Path) -> dict:
    """The `model:` section of a test server: the demo model's folder under `cache`, named
    (`source: dir`), so no setting or environment can put a test server on other weights."""
    from agent.model.demo import demo_model_dir

    return {"source": "dir", "dir": str(demo_model_dir(cache))}


class ServerProcess:
    def __init__(self, tmp: Path, cache: Path, overrides: dict | None = None, env: dict[str, str] | None = None,
                 allow_errors: list[str] | None = None, module: str | None = None, args: list[str] | None = None):
        """`allow_errors`: regular expressions for the error lines this test provokes on purpose;
        any other error, traceback or non-JSON line in the server's log fails the test at
        `stop()`, as does an exit status other than the one expected."""
        self.allowed = [re.compile(p) for p in (allow_errors or [])]
        self.stopped: int | None = None  # exit status once stop() has run its checks
        # below the kernel's ephemeral range, apart from the RTP ranges tests pick with stable_port():
        # no client's connect() can hold them (seen: the ops
        # port taken by an outgoing connection between the probe and the server's bind)
        self.port = stable_port(20000, 24000)
        self.sip_port = stable_port(20000, 24000)
        cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
        cfg["http"]["port"] = self.port
        cfg["sip"]["port"] = self.sip_port
        cfg["sip"]["enabled"] = False
        self.ops_port = stable_port(20000, 24000)
        cfg["ops"] = {"host": "127.0.0.1", "port": self.ops_port}
        cfg["logging"] = {"format": "json", "level": "info"}
        personas = tmp / "personas"
        if not personas.exists():
            shutil.copytree(ROOT / "personas", personas)
        cfg["personas"]["dir"] = str(personas)
        cfg["model"] = pinned_model(cache)
        # the caller's transcriber costs ~20 ms of every tick on these CPUs: on only where a test
        # asks for it (`overrides={"transcript": {"caller": "kyutai"}}`)
        cfg["transcript"] = {"caller": "off"}
        for section, values in (overrides or {}).items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        env = dict(env or {})
        # carriers fail closed: a test server that enables one gets real credentials (callers
        # made with `telnyx_caller`/`twilio_caller` present them), unless the test sets its own
        tw, tx = cfg.get("twilio", {}), cfg.get("telnyx", {})
        self.twilio_token = env.setdefault(tw.get("auth_token_env", "TWILIO_AUTH_TOKEN"), TEST_TWILIO_TOKEN)
        if tx.get("enabled") and not tx.get("allow_unauthenticated"):
            tx.setdefault("stream_auth_token_env", "TELNYX_STREAM_TOKEN")
        self.telnyx_token = env.setdefault(tx.get("stream_auth_token_env") or "TELNYX_STREAM_TOKEN",
                                           TEST_TELNYX_TOKEN)
        self.config = tmp / "server.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "server.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.ops_url = f"http://127.0.0.1:{self.ops_port}"  # /metrics, /api/calls, persona problems
        env = server_env(cache, env)
        self.log = open(self.log_path, "w")
        # `module`: a test wrapper of the server (e.g. tests.support.fake_server) instead of the CLI
        cmd = ([sys.executable, "-m", module, "--config", str(self.config), *(args or [])] if module
               else [sys.executable, "-m", "server", "serve", "--config", str(self.config)])
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=self.log, stderr=subprocess.STDOUT)

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

    def telnyx_caller(self, **kw):
        """A Telnyx caller on this server's /telnyx/media, presenting its stream token."""
        from tests.support.carriers import TelnyxCaller

        kw.setdefault("auth_token", self.telnyx_token)
        return TelnyxCaller(self.ws_url + "/telnyx/media", **kw)

    def twilio_caller(self, **kw):
        """A Twilio caller on this server's /twilio/media, signed and with its call's grant."""
        from tests.support.carriers import TwilioCaller

        kw.setdefault("auth_token", self.twilio_token)
        return TwilioCaller(self.ws_url + "/twilio/media", **kw)

    def lines(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def allow(self, *patterns: str) -> None:
        """Error lines matching these are expected (the test provoked them)."""
        self.allowed += [re.compile(p) for p in patterns]

    def unexpected_errors(self) -> list[str]:
        """Log lines that show a fault: not JSON (raw tracebacks, C libraries printing), or at
        level error/critical, or carrying an exception, and not allowed by this test."""
        bad = []
        for line in self.log_path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                faulty = not isinstance(entry, dict) or entry.get("level") in ("error", "critical") \
                    or "exception" in entry
            except ValueError:
                faulty = True
            if faulty and not any(p.search(line) for p in self.allowed):
                bad.append(line)
        return bad

    def stop(self, sig=signal.SIGTERM, timeout: float = 40.0, expect_exit: int | None = 0,
             check_log: bool = True) -> int:
        """Stop the server (if still running) and check how it went: its exit status (None:
        any) and its log (see `unexpected_errors`). Returns the exit status. Checked once: a
        second call (a fixture's clean-up after the test stopped it) only returns the status."""
        if self.stopped is not None:
            return self.stopped
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
        rc = self.stopped = self.proc.returncode
        if expect_exit is not None and rc != expect_exit:
            raise AssertionError(f"server exited {rc}, expected {expect_exit}:\n"
                                 + self.log_path.read_text()[-3000:])
        if check_log:
            bad = self.unexpected_errors()
            if bad:
                raise AssertionError(f"the server logged {len(bad)} unexpected error line(s):\n"
                                     + "\n".join(b[:2000] for b in bad[:10]))
        return rc


def wait_caller_heard(srv: "ServerProcess", timeout: float = 15.0) -> dict:
    """The only call in progress, once the server has received the caller's audio (or the
    timeout passed: the caller's assertions then say what was missing)."""
    def only_call():
        (call,) = http_json(srv.ops_url + "/api/calls")[1]["calls"]
        return call
    return poll(only_call, lambda c: c["frames_in"] > 10 and c["caller_peak"] > 0.05, timeout)


def wait_capacity(srv: "ServerProcess", capacity_left: int, timeout: float = 10.0) -> dict:
    """/readyz once it reports `capacity_left` free slots (or the timeout passed)."""
    status_ready = poll(lambda: http_json(srv.url + "/readyz"),
                        lambda r: r[0] == 200 and r[1]["capacity_left"] == capacity_left, timeout)
    return status_ready[1]


def unfinished_calls(srv: "ServerProcess") -> set[str]:
    """call_ids with a call_start line and no call_end line yet."""
    lines = srv.lines()
    return ({ln["call_id"] for ln in lines if ln.get("event") == "call_start"}
            - {ln["call_id"] for ln in lines if ln.get("event") == "call_end"})


def assert_calls_settled(srv: "ServerProcess", timeout: float = 20.0) -> None:
    """After a test on a shared server: every call it placed has ended and its call_end line is
    written, so no call of one test can end during the next one."""
    assert not poll(lambda: unfinished_calls(srv), lambda left: not left, timeout), "calls still up after the test"


def settles_calls_of(fixture: str):
    """An autouse fixture for a module sharing one server (`fixture`): after each test that used
    it, every call the test placed has ended (see `assert_calls_settled`)."""
    import pytest

    @pytest.fixture(autouse=True)
    def calls_settle(request):
        yield
        if fixture in request.fixturenames:
            assert_calls_settled(request.getfixturevalue(fixture))
    return calls_settle


def ended(srv: "ServerProcess", endpoint: str = "sip") -> set[str]:
    """call_ids of the calls over `endpoint` that have ended so far."""
    return {ln["call_id"] for ln in srv.lines() if ln.get("event") == "call_end" and ln.get("endpoint") == endpoint}


def call_end_of(srv: "ServerProcess", before: set[str], number: str, timeout: float = 10.0,
                endpoint: str = "sip") -> dict:
    """The call_end line of the one call to `number` that ended since `before` (waits for it:
    the line is written after the slot is freed). A call of an earlier test that ends late
    cannot be mistaken for it."""
    def new():
        return [ln for ln in srv.lines() if ln.get("event") == "call_end" and ln.get("endpoint") == endpoint
                and ln["call_id"] not in before and ln.get("number") == number]
    ends = poll(new, bool, timeout, step=0.1)
    assert len(ends) == 1, ends
    return ends[0]


def no_calls(srv: "ServerProcess", timeout: float = 15.0) -> bool:
    """True once the server lists no call in progress (within `timeout`)."""
    return not poll(lambda: http_json(srv.ops_url + "/api/calls")[1]["calls"], lambda c: not c, timeout, step=0.1)
