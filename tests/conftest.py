"""Shared fixtures: the golden reference model (from ../shared) and the built-in demo model."""

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


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "golden.json").exists():
        pytest.skip(GOLDEN_SKIP)
    return GOLDEN


@pytest.fixture(scope="session")
def golden(golden_dir) -> dict:
    return json.loads((golden_dir / "golden.json").read_text())


@pytest.fixture(scope="session")
def golden_model(golden_dir):
    from agent.model_files import local_model_files
    from agent.model_loader import load_model

    return load_model(local_model_files(golden_dir), device="cpu")


@pytest.fixture(scope="session")
def golden_input(golden_dir) -> np.ndarray:
    from agent.audio_io import read_audio

    return read_audio(golden_dir / "input.wav", 24000)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from agent.demo_model import demo_model_dir

    cache = Path(os.environ.get("PERSONAPLEX_TEST_CACHE", tmp_path_factory.mktemp("cache")))
    return demo_model_dir(cache)


@pytest.fixture
def server(tmp_path, demo_dir):
    """The real server (subprocess) on the demo model, with a single call slot: browser tests
    see both a call and "server busy" with it."""
    from tests.helpers_server import ServerProcess

    srv = ServerProcess(tmp_path, demo_dir.parent, {"engine": {"max_calls": 1, "retry_after_s": 3}})
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def demo_model(demo_dir):
    from agent.model_files import local_model_files
    from agent.model_loader import load_model

    return load_model(local_model_files(demo_dir), device="cpu")


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
