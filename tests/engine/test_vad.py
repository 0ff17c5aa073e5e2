"""Barge-in VAD, batched across calls: the same probabilities as Silero run call by call."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from agent.audio_io import read_audio
from agent.barge_in.vad import VAD_CHUNK, BatchedVad, VadStream
from tests.support import speechlike


@pytest.fixture(scope="module")
def vad():
    return BatchedVad()


def test_batched_vad_equals_silero_call_by_call(vad, spoken_wav):
    import silero_vad
    import torch

    speech16 = read_audio(spoken_wav, 16000)
    signals = [speech16[: 40 * VAD_CHUNK], np.zeros(30 * VAD_CHUNK, np.float32),
               speechlike(1.5, 3, sr=16000)[: 35 * VAD_CHUNK]]
    expected = []
    reference = silero_vad.load_silero_vad()
    for sig in signals:
        reference.reset_states()
        expected.append([float(reference(torch.from_numpy(sig[i:i + VAD_CHUNK].copy()), 16000))
                         for i in range(0, len(sig), VAD_CHUNK)])
    # one batch per round; streams join late and leave early, each keeps its own state
    streams = [VadStream() for _ in signals]
    got: list[list[float]] = [[] for _ in signals]
    starts = [0, 5, 2]
    for r in range(45):
        active = [i for i, sig in enumerate(signals) if starts[i] <= r < starts[i] + len(sig) // VAD_CHUNK]
        for i in active:
            k = r - starts[i]
            streams[i].pending = signals[i][k * VAD_CHUNK:(k + 1) * VAD_CHUNK].copy()
        if active:
            for i, p in zip(active, vad.forward([streams[i] for i in active])):
                got[i].append(p)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-4)  # batching changes float rounding only
    assert max(expected[0]) > 0.8 and max(expected[1]) < 0.3


def test_stream_resamples_24k_and_runs_whole_chunks(vad, spoken_wav):
    speech = read_audio(spoken_wav, 24000)
    s = VadStream()
    for i in range(0, len(speech), 480):  # 20 ms packets, as endpoints push them
        s.feed(speech[i:i + 480])
    probs = vad.run([s])[0]
    assert len(probs) >= len(speech) * 2 // 3 // VAD_CHUNK - 2 and len(s.pending) < VAD_CHUNK
    assert max(probs) > 0.8
    quiet = VadStream()
    quiet.feed(np.zeros(24000, np.float32))
    assert max(vad.run([quiet])[0]) < 0.3


def _live_sessions(n: int):
    from agent.barge_in.detector import BargeInConfig
    from agent.calls.events import CallState
    from agent.calls.session import CallSession
    from agent.personas.schema import Persona

    persona = Persona(id="p", kind="prompt", numbers=("1",), voice="NATF0", prompt="Hi.", source="p.yaml")
    sessions = []
    for _ in range(n):
        s = CallSession(persona, "1", "test", BargeInConfig(enabled=False))
        s.set_state(CallState.LIVE)
        sessions.append(s)
    return sessions


@contextlib.contextmanager
def _worker():
    """A started VAD worker (verdicts ignored), stopped afterwards."""
    from agent.barge_in.vad import VadVerdicts, VadWorker

    worker = VadWorker(VadVerdicts(lambda s: None, lambda s: None))
    worker.start()
    try:
        assert worker.wait_loaded()
        yield worker
    finally:
        worker.stop()


def test_audio_in_lumps_costs_one_forward_a_round(spoken_wav):
    """The SIP port hands a call's audio over once per engine tick (80 ms: two and a half
    chunks). Each round is still one forward of every call (the lump is worked off over the next
    rounds), not two or three forwards of a part of the calls; and every whole chunk is judged,
    the last ones too after the audio stops."""
    import time

    sessions = _live_sessions(6)
    speech = read_audio(spoken_wav, 24000)[: 48000]
    with _worker() as worker:
        t0 = time.monotonic()
        for k, i in enumerate(range(0, len(speech), 1920)):
            for s in sessions:  # each call's tick at its own moment
                worker.audio(s, speech[i:i + 1920])
                time.sleep(0.08 / len(sessions))
            time.sleep(max(0.0, t0 + (k + 1) * 0.08 - time.monotonic()))
        time.sleep(0.4)
    per_call = len(speech) * 2 // 3 // VAD_CHUNK
    assert worker.chunks >= 6 * (per_call - 1), (worker.chunks, per_call)
    assert worker.forwards <= worker.rounds * 1.1, (worker.forwards, worker.rounds)
    assert worker.rounds * 4 <= worker.chunks, (worker.rounds, worker.chunks)


def test_the_worker_runs_every_call_in_one_batch_per_chunk_time(spoken_wav):
    """Packets of 8 calls, each call's 20 ms packet at its own moment (as transports deliver
    them): every chunk is judged, and in rounds of about one per chunk's time (32 ms) with the
    calls batched, not in a forward per call per packet."""
    import time

    sessions = _live_sessions(8)
    speech = read_audio(spoken_wav, 24000)[: 24000]
    with _worker() as worker:
        for i in range(0, len(speech), 480):
            for s in sessions:
                worker.audio(s, speech[i:i + 480])
                time.sleep(0.0025)
        time.sleep(0.3)
    assert worker.chunks >= 8 * (len(speech) * 2 // 3 // VAD_CHUNK - 1)  # every whole chunk of every call
    assert worker.rounds * 4 <= worker.chunks, (worker.rounds, worker.chunks)  # batched: 8 calls a round
