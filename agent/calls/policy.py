"""Call policy: when the agent itself ends a call (context limit, maximum duration, dead endpoint).

Checked once per tick for every call; one reason to change: the rules a call centre sets on how
long a call may run and how long an endpoint may stay silent.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.calls.events import EndReason
from agent.calls.binding import CallBinding
from agent.timebase import frames_for


@dataclass(frozen=True)
class PolicyConfig:
    """What the policy needs of the call settings (`agent.calls.settings`: the defaults)."""

    context: int  # model frames the context holds
    # "reprime": re-primed before the limit (`agent.calls.reprime`), sliding only if a rebuild missed it;
    # "hangup" at the context limit; or "slide" (the prompt falls out)
    context_policy: str
    max_call_seconds: float | None
    idle_timeout_s: float


class CallPolicy:
    def __init__(self, cfg: PolicyConfig, on_context_limit=None):
        self.cfg = cfg
        self.max_frames = frames_for(cfg.max_call_seconds) if cfg.max_call_seconds else None
        self.on_context_limit = on_context_limit  # (session) -> None: counted once per call

    def verdict(self, binding: CallBinding, position: int, now: float) -> EndReason | None:
        """Why the call must end now, or None. `position`: what the call's slot holds."""
        sess = binding.session
        if position >= self.cfg.context - 1:
            if self.cfg.context_policy == "hangup":
                self._count(binding)
                return EndReason.CONTEXT_LIMIT
            if not binding.context_full:  # slide, or a re-prime that missed its deadline
                self._count(binding)
                sess.log.warning("context_full_sliding", steps=position)
        if self.max_frames is not None and binding.live_frames >= self.max_frames:
            return EndReason.MAX_DURATION
        if now - sess.last_activity > self.cfg.idle_timeout_s:
            return EndReason.ENDPOINT_TIMEOUT
        return None

    def _count(self, binding: CallBinding) -> None:
        if binding.context_full:
            return
        binding.context_full = True
        if self.on_context_limit is not None:
            self.on_context_limit(binding.session)
