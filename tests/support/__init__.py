"""Helpers every test layer shares: bounded waits, free ports, test signals.

Tests wait on what the system did, bounded, never on fixed sleeps (CI machines are slow and
loaded): `poll` is the one way to do that.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def poll(fetch, done, timeout: float, step: float = 0.2):
    """Call `fetch` until `done(value)` holds or `timeout` s have passed; return the last value.
    Tests wait on what the system did, bounded, never on fixed sleeps (CI machines are slow)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(step)


def free_port(kind=socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_STABLE_GIVEN: set[int] = set()  # never hand the same port to two servers of one test run
#: Tests run in parallel processes (pytest-xdist, `make test`): each takes its own share of every
#: port range, so two servers of one run never get the same port (the probe below cannot see a
#: port another process was given and has not bound yet).
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def _share(low: int, high: int) -> tuple[int, int]:
    """This test process's part of [low, high)."""
    size = (high - low) // _WORKERS
    return low + _WORKER * size, low + (_WORKER + 1) * size


def stable_port(low: int = 24000, high: int = 32000) -> int:
    """A port free for both UDP and TCP, below the kernel's ephemeral range (32768 up), for a
    server a test restarts on the same port: while it is down, no client's bind(0) or connect
    can take it (seen: a sipp caller got a killed agent's SIP port, and the restart failed)."""
    low, high = _share(low, high)
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(low, high)
        if port in _STABLE_GIVEN:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                u.bind(("127.0.0.1", port))
                t.bind(("127.0.0.1", port))
            _STABLE_GIVEN.add(port)
            return port
        except OSError:
            continue
    raise RuntimeError(f"no free port in {low}-{high}")


#: RTP port blocks a test server's `sip.rtp_port` comes from: below every `stable_port` range (a
#: server's HTTP, SIP and ops ports come from 20000-24000: seen, an RTP bind failing on another
#: server's port when the blocks reached 24000) and the kernel's ephemeral range, so no caller's
#: bind(0) takes them and no two servers of a run share one.
RTP_LOW, RTP_HIGH, RTP_BLOCK = 10000, 20000, 100
_RTP_GIVEN: set[int] = set()


def rtp_ports() -> int:
    """The first port of a block of RTP_BLOCK UDP ports for one test server (its `sip.rtp_port`),
    never handed out twice in one run; the first block whose first pair binds, from a random
    start (other test runs on this machine start elsewhere). pjsua takes the next free pair if
    one is busy, so a block is a starting point, not a fence."""
    blocks = list(range(*_share(RTP_LOW, RTP_HIGH), RTP_BLOCK))
    first = random.randrange(len(blocks))
    for base in blocks[first:] + blocks[:first]:
        if base in _RTP_GIVEN:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                a.bind(("127.0.0.1", base))
                b.bind(("127.0.0.1", base + 1))
        except OSError:
            continue
        _RTP_GIVEN.add(base)
        return base
    raise RuntimeError(f"no free RTP block in {RTP_LOW}-{RTP_HIGH}")


def frames_of(pcm: np.ndarray, frame: int = 1920) -> list[np.ndarray]:
    n = -(-len(pcm) // frame)
    padded = np.zeros(n * frame, dtype=np.float32)
    padded[: len(pcm)] = pcm
    return [padded[i * frame:(i + 1) * frame] for i in range(n)]


def speechlike(seconds: float, seed: int, sr: int = 24000) -> np.ndarray:
    """A deterministic non-silent test signal (tone bursts + noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f = 150 + 60 * seed % 200
    env = (np.sin(2 * np.pi * 1.7 * t) > 0).astype(np.float32)
    return (0.3 * env * np.sin(2 * np.pi * f * t) + 0.03 * rng.standard_normal(len(t))).astype(np.float32)


def speech_wav(path: Path, text: str, rate: int) -> Path:
    """Speech from espeak-ng, converted by sox to `rate` Hz mono 16-bit."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(path)], check=True,
                   capture_output=True)
    return path


def spoken_ulaw_wav(d: Path, text: str) -> Path:
    """`text` spoken by espeak-ng as an 8 kHz μ-law wav: what a sipp callee's rtp_stream plays."""
    wav8 = speech_wav(d / "callee8k.wav", text, 8000)
    out = d / "callee_ulaw.wav"
    subprocess.run(["sox", str(wav8), "-e", "u-law", str(out)], check=True)
    return out


def voicemail_greeting_ulaw(d: Path, name: str) -> bytes:
    """A voicemail greeting (about 6 s of espeak-ng speech) as raw 8 kHz μ-law bytes, what an
    answering machine plays: the outbound tests' callee when it is not a person."""
    wav8 = speech_wav(d / "greeting8k.wav", f"Hi, you have reached {name}. I can't take your call right now. "
                      "Please leave a message after the tone.", 8000)
    raw = d / "greeting.ulaw"
    subprocess.run(["sox", str(wav8), "-t", "raw", "-e", "u-law", str(raw)], check=True)
    return raw.read_bytes()


#: What each external component is and how the project's own set-up installs it.
INSTALLED_BY = {
    "espeak-ng": "Debian package espeak-ng, installed by scripts/setup.sh (make test runs it)",
    "sox": "Debian package sox, installed by scripts/setup.sh",
    "sipp": "Debian package sip-tester, installed by scripts/setup.sh",
    "chromium": "Debian package chromium, installed by scripts/setup.sh",
    "firefox-esr": "Debian package firefox-esr, installed by scripts/setup.sh",
    "kamailio": "Debian package kamailio, installed by scripts/setup.sh",
    "haproxy": "Debian package haproxy, installed by scripts/setup.sh",
    "redis-server": "Debian package redis-server, installed by scripts/setup.sh",
    "systemd-analyze": "Debian package systemd, installed by scripts/setup.sh",
    "pjsua2": "built from Debian's pjproject source by scripts/build_pjsua2.sh (run by scripts/setup.sh)",
}


def require(component: str) -> None:
    """Fail (never skip) when a component the tests need is missing: a green run must mean the
    behaviour was checked. One line says what is missing and how the set-up installs it."""
    import importlib.util
    import shutil

    import pytest

    present = (importlib.util.find_spec(component) is not None if component == "pjsua2"
               else shutil.which(component) is not None)
    if not present:
        pytest.fail(f"required test component missing: {component} ({INSTALLED_BY.get(component, '')})",
                    pytrace=False)


def components_fixture(*components: str):
    """A module's autouse fixture that `require`s each component before its first test:
    `components = components_fixture("pjsua2", "sipp")` (pytest names it by the attribute)."""
    import pytest

    @pytest.fixture(scope="module", autouse=True)
    def _components() -> None:
        for c in components:
            require(c)
    return _components


def machine_cannot(reason: str) -> None:
    """A check this machine cannot make (too slow for a timing promise, say): a visible skip
    with the reason (listed in every run's summary: `make test` passes `-rs`), never a silent pass.
    With PERSONAPLEX_STRICT_MACHINE=1 (a CI machine sized for every check) a failure instead; the
    project's own CI runs on 2 shared cores, where these checks cannot hold."""
    import os

    import pytest

    if os.environ.get("PERSONAPLEX_STRICT_MACHINE") == "1":
        pytest.fail(f"this machine cannot make a check it was declared sized for: {reason}", pytrace=False)
    pytest.skip(reason)

