"""Helpers every test layer shares: bounded waits, free ports, test signals.

Tests wait on what the system did, bounded, never on fixed sleeps (CI machines are slow and
loaded): `poll` is the one way to do that.
"""

from __future__ import annotations

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


def stable_port(low: int = 24000, high: int = 32000) -> int:
    """A port free for both UDP and TCP, below the kernel's ephemeral range (32768 up), for a
    server a test restarts on the same port: while it is down, no client's bind(0) or connect
    can take it (seen: a sipp caller got a killed agent's SIP port, and the restart failed)."""
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


#: What each external component is and how the project's own set-up installs it.
INSTALLED_BY = {
    "espeak-ng": "Debian package espeak-ng, installed by scripts/setup.sh (make test runs it)",
    "sox": "Debian package sox, installed by scripts/setup.sh",
    "sipp": "Debian package sip-tester, installed by scripts/setup.sh",
    "chromium": "Debian package chromium, installed by scripts/setup.sh",
    "firefox-esr": "Debian package firefox-esr, installed by scripts/setup.sh",
    "kamailio": "Debian package kamailio, installed by scripts/setup.sh",
    "haproxy": "Debian package haproxy, installed by scripts/setup.sh",
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
