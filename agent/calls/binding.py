"""What the scheduler keeps for each call it runs: the call's place in the batch and its clock.

A `CallSession` is what an endpoint sees (audio in and out, events); how the scheduler runs the
call (which slot, how many live frames, whether it waits for its caller's frame, the prompt
phase a re-prime replays) is the scheduler's own business and lives here, in one object per
call owned by the scheduler, as moshi keeps a stream's state in one object owned by whoever
steps it. Every field is written on the engine thread only (the start lane's preparation
thread never touches a binding); `Scheduler.binding_of` reads one for tests and tools.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.calls.session import CallSession
from agent.model.generator import PromptPlan


@dataclass(eq=False)
class CallBinding:
    session: CallSession
    placed_tick: int  # engine tick at admission: answer latency in ticks is load-independent
    slot: int | None = None  # the batch row, once its prompt phase is in the model
    live_frames: int = 0  # conversation frames produced (the first frame excluded)
    waited_ticks: int = 0  # consecutive ticks the call waited for its caller frame
    context_full: bool = False  # reached the model's context (counted once)
    prompt_plan: PromptPlan | None = None  # the prompt phase it started with: what a re-prime replays

    @property
    def call_id(self) -> str:
        return self.session.call_id


__all__ = ["CallBinding"]
