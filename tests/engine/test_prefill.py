"""Prefill: a prompt phase run as one forward starts a call exactly as stepping it frame by frame,
and never disturbs the calls already live in the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.model.engine import Engine
from agent.model.generator import Phase
from agent.model.sampling import SamplingParams
from tests.support import speechlike

CITYSAN = "You work for CitySan Services which is a waste management and your name is Ayelen Lucero."


def converse(eng, slot, frames, feed_others=None, record_others=None):
    """Step until `slot` has emitted its first frame plus one per caller frame."""
    outs = []
    while len(outs) < len(frames) + 1:
        feed = dict(feed_others or {})
        if outs:
            feed[slot] = frames[len(outs) - 1]
        res = eng.step(feed)
        if slot in res:
            outs.append(res[slot])
        if record_others is not None:
            for b, o in res.items():
                if b != slot:
                    record_others.setdefault(b, []).append(o.tokens)
    return outs


def tokens(outs):
    return np.stack([o.tokens for o in outs])


@pytest.mark.parametrize("sampling", [SamplingParams(greedy=True), SamplingParams()], ids=["greedy", "sampled"])
def test_prefilled_start_equals_stepped_prompt_and_leaves_live_rows_alone(demo_model, sampling):
    frames = [speechlike(0.08, k) for k in range(12)]
    neighbour_in = [speechlike(0.08, 90 + k) for k in range(40)]
    with Engine(demo_model, 3) as eng:
        sch = eng.schedule("NATF2", CITYSAN)
        # reference: the prompt stepped frame by frame, alone
        eng.start_stepped(0, sch, sampling, seed=11)
        reference = converse(eng, 0, frames)
        eng.release(0)
        # the neighbour alone, for comparison
        eng.start(1, eng.schedule("VARM1", "You enjoy having a good conversation."), SamplingParams(), seed=3)
        eng.run_prompt(1)
        alone = [eng.step({1: f})[1].tokens for f in neighbour_in]
        eng.release(1)

        # now the neighbour talks in row 1 while the call is prefilled into row 2 mid-conversation
        eng.start(1, eng.schedule("VARM1", "You enjoy having a good conversation."), SamplingParams(), seed=3)
        eng.run_prompt(1)
        seen = [eng.step({1: f})[1].tokens for f in neighbour_in[:5]]
        positions_before = eng.position(1)
        eng.start(2, sch, sampling, seed=11)  # one forward, in a state of its own
        assert eng.position(1) == positions_before  # the live row did not move
        assert eng.phase(2) is Phase.PROMPT and eng.position(2) == sch.steps - 1
        it = iter(neighbour_in[5:])
        prefilled = []
        while len(prefilled) < len(frames) + 1:
            feed = {1: next(it)}
            if prefilled:
                feed[2] = frames[len(prefilled) - 1]
            res = eng.step(feed)
            if 2 in res:
                prefilled.append(res[2])
            seen.append(res[1].tokens)
    assert prefilled[0].first
    np.testing.assert_array_equal(tokens(prefilled), tokens(reference))
    np.testing.assert_allclose(np.concatenate([o.pcm for o in prefilled]),
                               np.concatenate([o.pcm for o in reference]), atol=1e-5)
    np.testing.assert_array_equal(np.stack(seen), np.stack(alone[: len(seen)]))


def test_calls_prefilled_together_equal_each_alone(demo_model):
    """Two calls starting in the same tick share one forward (different prompt lengths, voices)."""
    calls = [("NATF2", CITYSAN), ("NATM0", "You are a wise and friendly teacher.")]
    frames = [speechlike(0.08, k) for k in range(8)]
    greedy = SamplingParams(greedy=True)
    with Engine(demo_model, 2) as eng:
        alone = []
        for voice, prompt in calls:
            eng.start_stepped(0, eng.schedule(voice, prompt), greedy)
            alone.append(tokens(converse(eng, 0, frames)))
            eng.release(0)
        plans = [eng.prepare(eng.schedule(v, p), greedy) for v, p in calls]
        assert plans[0].steps != plans[1].steps
        run = eng.prefill([(0, plans[0]), (1, plans[1])])
        assert run.advance()  # one forward for both
        assert run.install() == [0, 1]
        together: dict[int, list] = {0: [], 1: []}
        while any(len(v) < len(frames) + 1 for v in together.values()):
            feed = {b: frames[len(together[b]) - 1] for b in (0, 1)
                    if together[b] and len(together[b]) <= len(frames)}
            for b, o in eng.step(feed).items():
                if len(together[b]) < len(frames) + 1:
                    together[b].append(o)
    for b in (0, 1):
        np.testing.assert_array_equal(tokens(together[b]), alone[b])


def test_chunked_prefill_equals_one_forward(demo_model):
    """A prompt too long for one tick's spare time runs in chunks; the result is the same."""
    greedy = SamplingParams(greedy=True)
    frames = [speechlike(0.08, k) for k in range(6)]
    with Engine(demo_model, 1) as eng:
        sch = eng.schedule("VARF1", CITYSAN + " Information: the depot opens at seven.")
        eng.start(0, sch, greedy)
        whole = tokens(converse(eng, 0, frames))
        eng.release(0)
        run = eng.prefill([(0, eng.prepare(sch, greedy))])
        chunks = 0
        while not run.advance(16):
            chunks += 1
        assert chunks >= (sch.steps - 1) // 16 - 1
        with pytest.raises(RuntimeError):
            eng.prefill([(0, eng.prepare(sch, greedy))]).install()  # not advanced: refused
        run.install()
        np.testing.assert_array_equal(tokens(converse(eng, 0, frames)), whole)


def test_plan_matches_the_stepped_token_ring(demo_model):
    """The token ring a plan predicts is the one stepping leaves, for a stock (.pt) voice."""
    greedy = SamplingParams(greedy=True)
    with Engine(demo_model, 1) as eng:
        sch = eng.schedule("NATF0", "Hi there.")
        plan = eng.generator.plan(sch)
        eng.start_stepped(0, sch, greedy)
        for _ in range(plan.steps):
            eng.step({})
        g = eng.generator
        assert g.slots[0].offset == plan.steps
        assert torch.equal(g.cache[0].cpu(), plan.cache) and torch.equal(g.provided[0].cpu(), plan.provided)
