"""Shared fixtures: the golden reference model (from ../shared) and the built-in demo model.

Tests live in three folders by cost, each marked accordingly (`-m unit` etc.):
- tests/unit: no model, no subprocess: seconds; the inner loop while you work;
- tests/engine: tiny models in process (engine, prefill, scheduler, VAD);
- tests/e2e: server processes, sipp, pjsua2 callers, browsers, carrier clients.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NO_TORCH_COMPILE", "1")

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("PERSONAPLEX_GOLDEN", ROOT.parent / "shared" / "golden" / "personaplex-tiny"))
GOLDEN_SKIP = ("needs ../shared/golden/personaplex-tiny (vectors computed by the PersonaPlex reference "
               "implementation; only present inside this workplace)")


LAYERS = ("unit", "engine", "e2e")


#: One more try for an engine or e2e test (see pytest_collection_modifyitems); 0 turns it off.
REALTIME_RERUNS = int(os.environ.get("PERSONAPLEX_TEST_RERUNS", "1"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts and parts[0] in LAYERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
        if parts and parts[0] in ("engine", "e2e"):
            # engine and e2e tests run the scheduler in real time (80 ms ticks; e2e: 20 ms
            # packets, real peers) on a shared 2-core machine; a tick that came late because another process took the cores can fail one
            # timing bound. Such a test is run once more and the rerun is reported (`R`, and the
            # "rerun" line of the summary); failing twice fails the suite, so a real fault still does.
            item.add_marker(pytest.mark.flaky(reruns=REALTIME_RERUNS, reruns_delay=1))


#: (test, what its failed attempt said) for every rerun: `-rR` lists only the names
_RERUN_FAILURES: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.outcome == "rerun":
        _RERUN_FAILURES.append((report.nodeid, report.longreprtext))


def pytest_terminal_summary(terminalreporter):
    """A rerun that passed is a timing margin worth looking at, so its first failure is printed
    (the last lines of it) where a CI log keeps it."""
    if _RERUN_FAILURES:
        terminalreporter.section("first failure of each rerun test")
        for nodeid, text in _RERUN_FAILURES:
            terminalreporter.write_line(f"--- {nodeid}")
            terminalreporter.write_line("\n".join(text.splitlines()[-40:]))


@pytest.fixture(autouse=True)
def _structlog_config_per_test():
    """A command run in-process (`personas check` sets level error) configures structlog for the
    whole process; restored after each test, so a later test's `capture_logs` sees every level."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="module", autouse=True)
def _no_process_outlives_its_module():
    """Every server, sipp, browser or client a module starts is stopped by its own fixtures; one
    left running would eat the 2 cores the later real-time tests need (their timing, not their
    logic, would fail). A survivor is killed and named in a warning, so the leak gets fixed."""
    import warnings

    import psutil

    yield
    me = psutil.Process()
    left = me.children(recursive=True)
    if not left:
        return
    _, alive = psutil.wait_procs(left, timeout=3)
    for p in alive:
        try:
            name = " ".join(p.cmdline()[:4])
            p.kill()
        except psutil.Error:
            continue
        warnings.warn(f"a process outlived its test module and was killed: {name}", stacklevel=1)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "golden.json").exists():
        if os.environ.get("PERSONAPLEX_REQUIRE_GOLDEN"):  # CI: the one allowed skip is not allowed
            pytest.fail(f"PERSONAPLEX_REQUIRE_GOLDEN is set but {GOLDEN} is missing", pytrace=False)
        pytest.skip(GOLDEN_SKIP)
    return GOLDEN


@pytest.fixture(scope="session")
def golden(golden_dir) -> dict:
    return json.loads((golden_dir / "golden.json").read_text())


@pytest.fixture(scope="session")
def golden_model(golden_dir):
    from agent.model.files import local_model_files
    from agent.model.loader import load_model

    return load_model(local_model_files(golden_dir), device="cpu")


@pytest.fixture(scope="session")
def golden_input(golden_dir) -> np.ndarray:
    from agent.audio_io import read_audio

    return read_audio(golden_dir / "input.wav", 24000)


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo model, from the same cache `make run` uses ($PERSONAPLEX_CACHE, default
    ~/.cache/personaplex-agent): built once (versioned, atomically, under a lock), then shared
    by every test run. Test servers name this folder (`model.source: dir`)."""
    from agent.model.demo import default_cache_dir, demo_model_dir

    return demo_model_dir(default_cache_dir())


@pytest.fixture
def server(tmp_path, demo_dir):
    """The real server (subprocess) on the demo model, with a single call slot: browser tests
    see both a call and "server busy" with it."""
    from tests.support.server import ServerProcess

    srv = ServerProcess(tmp_path, demo_dir.parent, {"engine": {"max_calls": 1, "retry_after_s": 3}})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def spoken_wav(tmp_path_factory) -> Path:
    """A caller's sentence spoken by espeak-ng (24 kHz mono)."""
    import subprocess

    from tests.support import require

    require("espeak-ng")
    out = tmp_path_factory.mktemp("speech") / "hello.wav"
    subprocess.run(["espeak-ng", "-w", str(out), "Hello, I would like to change my pickup day please."],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def caller_wav(tmp_path_factory) -> str:
    """A browser caller's sentence (48 kHz, what Chromium's fake microphone and aiortc take)."""
    from tests.support import require, speech_wav

    require("espeak-ng")
    require("sox")
    d = tmp_path_factory.mktemp("webaudio")
    return str(speech_wav(d / "caller48k.wav", "Hello, I am calling about my pickup schedule.", 48000))


@pytest.fixture(scope="session")
def demo_model(demo_dir):
    from agent.model.files import local_model_files
    from agent.model.loader import load_model

    return load_model(local_model_files(demo_dir), device="cpu")
