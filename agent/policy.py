"""Call policy: when the agent itself ends a call (context limit, maximum duration, dead endpoint).

Checked once per tick for every call; one reason to change: the rules a call centre sets on how
long a call may run and how long an endpoint may stay silent.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.events import EndReason
from agent.session import CallSession
from agent.timebase import frames_for


@dataclass(frozen=True)
class PolicyConfig:
    context: int  # model frames the context holds
    context_policy: str = "hangup"  # "hangup" at the context limit, or "slide" (the prompt falls out)
    max_call_seconds: float | None = 230.0
    idle_timeout_s: float = 20.0


class CallPolicy:
    def __init__(self, cfg: PolicyConfig, on_context_limit=None):
        self.cfg = cfg
        self.max_frames = frames_for(cfg.max_call_seconds) if cfg.max_call_seconds else None
        self.on_context_limit = on_context_limit  # (session) -> None: counted once per call

    def verdict(self, sess: CallSession, position: int, now: float) -> EndReason | None:
        """Why `sess` must end now, or None. `position`: model steps the call's slot has taken."""
        if position >= self.cfg.context - 1:
            if self.cfg.context_policy == "hangup":
                self._count(sess)
                return EndReason.CONTEXT_LIMIT
            if not sess.context_full:
                self._count(sess)
                sess.log.warning("context_full_sliding", steps=position)
        if self.max_frames is not None and sess.live_frames >= self.max_frames:
            return EndReason.MAX_DURATION
        if now - sess.last_activity > self.cfg.idle_timeout_s:
            return EndReason.ENDPOINT_TIMEOUT
        return None

    def _count(self, sess: CallSession) -> None:
        if sess.context_full:
            return
        sess.context_full = True
        if self.on_context_limit is not None:
            self.on_context_limit(sess)
