"""Batched slots are independent: a call's output does not depend on its neighbours."""

from __future__ import annotations

import numpy as np
import pytest

from agent.model.engine import Engine
from agent.model.generator import Phase
from agent.model.sampling import SamplingParams
from tests.support import frames_of, speechlike

CALLS = [
    # (voice, prompt, input seed, start frame, frames)
    ("NATF2", "You work for CitySan Services which is a waste management and your name is Ayelen Lucero.", 1, 0, 14),
    ("VARM1", "You enjoy having a good conversation.", 2, 3, 10),
    ("NATM0", "You are a wise and friendly teacher.", 3, 7, 12),
]


def alone(model, voice, prompt, pcm, sampling, seed):
    with Engine(model, 1) as eng:
        eng.start(0, eng.schedule(voice, prompt), sampling, seed=seed)
        outs = [eng.run_prompt(0)]
        for f in frames_of(pcm):
            outs.append(eng.step({0: f})[0])
    return outs


@pytest.mark.parametrize("sampling", [SamplingParams(greedy=True), SamplingParams()], ids=["greedy", "sampled"])
def test_call_in_batch_equals_call_alone(demo_model, sampling):
    inputs = [speechlike(n * 0.08, seed) for (_, _, seed, _, n) in CALLS]
    expected = [alone(demo_model, v, p, x, sampling, seed=100 + i)
                for i, ((v, p, _, _, _), x) in enumerate(zip(CALLS, inputs))]

    got: dict[int, list] = {i: [] for i in range(len(CALLS))}
    slot_of: dict[int, int] = {}
    fed: dict[int, int] = {i: 0 for i in range(len(CALLS))}
    with Engine(demo_model, 4) as eng:
        # a fourth slot churns: started, stepped, freed, restarted, so rows get reused
        churn = eng.schedule("VARF4", "Noise neighbour.")
        eng.start(3, churn, SamplingParams(), seed=5)
        t = 0
        while any(len(got[i]) < len(expected[i]) for i in got) and t < 1000:
            for i, (v, p, _, start, _) in enumerate(CALLS):
                if t == start * 10:  # different start times, mid-prompt of the others
                    slot_of[i] = [0, 1, 2][i]
                    eng.start(slot_of[i], eng.schedule(v, p), sampling, seed=100 + i)
            if t == 45:
                eng.release(3)
            if t == 50:
                eng.start(3, churn, SamplingParams(), seed=6)
            feed = {}
            for i, b in slot_of.items():
                if eng.phase(b) is Phase.LIVE and len(got[i]) < len(expected[i]):
                    frames = frames_of(inputs[i])
                    feed[b] = frames[fed[i]] if fed[i] < len(frames) else np.zeros(1920, np.float32)
                    fed[i] += 1
            feed[3] = speechlike(0.08, t)
            res = eng.step(feed)
            for i, b in slot_of.items():
                if b in res and len(got[i]) < len(expected[i]):
                    got[i].append(res[b])
            t += 1
    for i in got:
        exp_tok = np.stack([o.tokens for o in expected[i]])
        got_tok = np.stack([o.tokens for o in got[i]])
        np.testing.assert_array_equal(got_tok, exp_tok, err_msg=f"call {i}")
        np.testing.assert_allclose(np.concatenate([o.pcm for o in got[i]]),
                                   np.concatenate([o.pcm for o in expected[i]]), atol=1e-5)


def test_released_slot_is_reusable_and_free_slots_listed(demo_model):
    with Engine(demo_model, 2) as eng:
        assert eng.free_slots() == [0, 1]
        eng.start(1, eng.schedule("NATF0", "Hi."), SamplingParams(greedy=True))
        assert eng.free_slots() == [0]
        with pytest.raises(RuntimeError):
            eng.start(1, eng.schedule("NATF0", "Hi."), SamplingParams(greedy=True))
        first = eng.run_prompt(1)
        assert first.first and first.pcm.shape == (1920,)
        eng.release(1)
        assert eng.free_slots() == [0, 1] and not eng.busy()
