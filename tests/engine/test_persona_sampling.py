"""A persona's `sampling:` overrides reach the engine through the scheduler: a persona with
`sampling: {greedy: true}` answers the same way whatever the call's random seed, while the same
persona without the override (sampled, the server's default) does not."""

from __future__ import annotations

import numpy as np
import pytest

from agent.barge_in.detector import BargeInConfig
from agent.calls.events import CallState
from agent.personas import load_persona_dir
from agent.model.sampling import SamplingParams
from agent.calls.scheduler import Scheduler, SchedulerConfig
from agent.model.voices import STOCK_VOICES
from tests.support import poll

FRAMES = 10
PERSONA = "kind: assistant\nnumbers: ['{number}']\nrole: a careful clerk\nvoice: NATF0\n"


@pytest.fixture
def scheduler(demo_model):
    # the server's default is sampled; no caller audio: every call hears the same silence
    sch = Scheduler(demo_model, SchedulerConfig(max_calls=1, inbound_wait_ticks=0,
                                                barge_in=BargeInConfig(enabled=False),
                                                sampling=SamplingParams()))
    sch.start()
    try:
        assert sch.warm_up("NATF0", "Hello.")
        yield sch
    finally:
        sch.stop()


@pytest.fixture
def personas(tmp_path):
    (tmp_path / "greedy.yaml").write_text(PERSONA.format(number="100") + "sampling: {greedy: true}\n")
    (tmp_path / "sampled.yaml").write_text(PERSONA.format(number="200"))
    reg = load_persona_dir(tmp_path, STOCK_VOICES)
    assert reg.issues == []
    return reg


def first_frames(sch: Scheduler, persona, seed: int) -> tuple[np.ndarray, list]:
    """The agent's first FRAMES frames (audio, text) of one call with this seed."""
    frames: list = []

    def attach(sess):
        sess.add_frame_tap(lambda caller, agent, text, index: frames.append((agent.copy(), text)))
    sch.on_call_start.append(attach)
    try:
        sess = sch.place_call(persona, persona.numbers[0], "test", seed=seed)
        poll(lambda: len(frames), lambda n: n >= FRAMES, 30, step=0.02)
        sess.hangup()
        poll(lambda: sess.state, lambda s: s is CallState.ENDED, 10, step=0.02)
    finally:
        sch.on_call_start.remove(attach)
    assert len(frames) >= FRAMES, len(frames)
    return np.stack([a for a, _ in frames[:FRAMES]]), [t for _, t in frames[:FRAMES]]


def test_greedy_override_makes_calls_independent_of_the_seed(scheduler, personas):
    greedy, sampled = personas.route("100"), personas.route("200")
    assert greedy.sampling(SamplingParams()).greedy and not sampled.sampling(SamplingParams()).greedy
    a_pcm, a_text = first_frames(scheduler, greedy, seed=1)
    b_pcm, b_text = first_frames(scheduler, greedy, seed=2)
    np.testing.assert_array_equal(a_pcm, b_pcm)
    assert a_text == b_text
    # the control: without the override the seed changes what the agent says
    c_pcm, _ = first_frames(scheduler, sampled, seed=1)
    d_pcm, _ = first_frames(scheduler, sampled, seed=2)
    assert not np.array_equal(c_pcm, d_pcm)
    # and the greedy answer is not what sampling gives
    assert not np.array_equal(a_pcm, c_pcm)
