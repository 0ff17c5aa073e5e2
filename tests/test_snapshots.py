"""Instant answer: a call restored from a persona snapshot equals a call that ran its prompt phase."""

from __future__ import annotations

import numpy as np
import pytest

from agent.engine import Engine
from agent.sampling import SamplingParams
from tests.conftest import speechlike


def converse(eng, slot, frames, feed_others=None):
    outs = []
    while len(outs) < len(frames) + 1:
        feed = dict(feed_others or {})
        if outs:
            feed[slot] = frames[len(outs) - 1]
        res = eng.step(feed)
        if slot in res:
            outs.append(res[slot])
    return outs


@pytest.mark.parametrize("sampling", [SamplingParams(greedy=True), SamplingParams()], ids=["greedy", "sampled"])
def test_snapshot_start_equals_full_prompt(demo_model, sampling):
    frames = [speechlike(0.08, k) for k in range(12)]
    prompt = "You work for CitySan Services which is a waste management and your name is Ayelen Lucero."
    with Engine(demo_model, 3) as eng:
        sch = eng.schedule("NATF2", prompt)
        eng.start(0, sch, sampling, seed=11)
        reference = converse(eng, 0, frames)
        eng.release(0)

        # build the snapshot in row 2 while row 1 is busy with another call
        eng.start(1, eng.schedule("VARM1", "You enjoy having a good conversation."), SamplingParams(), seed=3)
        eng.start(2, sch, SamplingParams(greedy=True), hold_before_last=True)
        while not eng.held(2):
            eng.step({1: speechlike(0.08, 99)})
        snap = eng.capture(2)
        eng.release(2)
        assert snap.rows.positions == sch.steps - 1
        # the snapshot goes into a different row than it was built in
        eng.restore(0, snap, sampling, seed=11)
        restored = converse(eng, 0, frames, feed_others={1: speechlike(0.08, 98)})
    assert restored[0].first
    np.testing.assert_array_equal(np.stack([o.tokens for o in restored]), np.stack([o.tokens for o in reference]))
    np.testing.assert_allclose(np.concatenate([o.pcm for o in restored]),
                               np.concatenate([o.pcm for o in reference]), atol=1e-5)


def test_capture_requires_a_held_slot(demo_model):
    with Engine(demo_model, 1) as eng:
        eng.start(0, eng.schedule("NATF0", "Hi."), SamplingParams(greedy=True))
        with pytest.raises(RuntimeError):
            eng.capture(0)
