"""Prompt phases in one forward: how a call starts within a frame or two, whatever its prompt.

During the prompt phase every input is known in advance (voice-prompt embeddings, then forced
silence, sine and text columns: `TokenGenerator.plan`), so the temporal transformer can take the
whole phase, but its final step, as one `[n, T, dim]` forward in streaming mode instead of T
steps of the live batch. The forward runs in a streaming state of its own, sized for the
starting calls only (n rows, T positions), and the resulting rows are copied into their call
slots (`slot_state.copy_rows`). Live rows are never touched: they are neither stepped nor
masked by a prefill, and the copy writes only the starting calls' own rows. The final prompt
step then runs in the ordinary batched step, as in the reference, and emits the call's first
frame.

A long prefill can be cut into chunks (`advance(max_steps)`) so that it fits in the spare time
of the engine's ticks: the separate state simply carries on from where the last chunk ended.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agent.model.generator import PromptPlan, TokenGenerator
from agent.model.sampling import SamplingParams
from agent.model.slot_state import copy_rows, fresh_states
from agent.timebase import NUM_STREAMS


@dataclass(frozen=True)
class StartPlan:
    """Everything a call's start needs except the model: built off the engine thread."""

    plan: PromptPlan
    sampling: SamplingParams
    rng: torch.Generator | None  # already advanced past the prefilled steps' random draws

    @property
    def steps(self) -> int:
        return self.plan.steps


class PrefillRun:
    """The prompt phases of calls starting together, as one forward (or chunks of it)."""

    def __init__(self, generator: TokenGenerator, starts: list[tuple[int, StartPlan]]):
        self.generator = generator
        self.starts = starts
        self.lengths = [sp.steps for _, sp in starts]
        self.total = max(self.lengths, default=0)
        self.done_steps = 0
        self.x: torch.Tensor | None = None
        self.states = None
        if self.total:
            self._prepare_inputs()

    def _prepare_inputs(self) -> None:
        gen = self.generator
        dev = gen.device
        n = len(self.starts)
        cols = torch.zeros(n, NUM_STREAMS, self.total, dtype=torch.long)
        for i, (_, sp) in enumerate(self.starts):
            cols[i, :, : sp.steps] = sp.plan.columns.T
        with torch.no_grad():
            x = gen.embed(cols.to(dev))  # [n, T, dim]
            for i, (_, sp) in enumerate(self.starts):
                emb = sp.plan.schedule.embeddings
                if emb is not None:
                    e = min(emb.shape[0], sp.steps)
                    x[i, :e] = emb[:e].to(device=dev, dtype=x.dtype)
        self.x = x
        self.states = fresh_states(gen.lm.transformer, n, self.total, dev)

    @property
    def done(self) -> bool:
        return self.done_steps >= self.total

    @torch.no_grad()
    def advance(self, max_steps: int | None = None) -> bool:
        """Run the next `max_steps` prompt steps of every starting call (all that are left if
        None) in the prefill state; True when the whole prompt phase has been run."""
        if self.done:
            return True
        a = self.done_steps
        b = self.total if max_steps is None else min(self.total, a + max(1, max_steps))
        transformer = self.generator.lm.transformer
        live = transformer.get_streaming_state()
        transformer.set_streaming_state(self.states)
        try:
            transformer(self.x[:, a:b])
        finally:
            transformer.set_streaming_state(live)
        self.done_steps = b
        return self.done

    def install(self) -> list[int]:
        """Copy the prefilled rows into their slots (which must be free); returns the slots. Each
        slot's next step is its final prompt step, which emits its first frame."""
        if not self.done:
            raise RuntimeError("prefill not finished")
        gen = self.generator
        for row, _ in self.starts:
            gen.reset_row(row)
        if self.states is not None:
            copy_rows(self.states, gen.lm.transformer.get_streaming_state(),
                      [(i, row, sp.steps) for i, (row, sp) in enumerate(self.starts)])
        for row, sp in self.starts:
            gen.install(row, sp.plan, sp.sampling, sp.rng)
        self.x = self.states = None  # the prefill state is not needed any more
        return [row for row, _ in self.starts]
