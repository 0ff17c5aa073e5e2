"""The call service's settings an operator sets: their one model, defaults and bounds.

The server's `engine:` config section is this model (plus what only the server does with it:
`server.config.EngineConfig`), and the scheduler's own config extends it with what only code
and tests set (`agent.calls.scheduler.SchedulerConfig`), so a default or a bound is written once.
No torch here: config checks and unit tests load no model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.barge_in.detector import BargeInConfig
from agent.model.sampling_params import SamplingParams

#: The call length limit when none is set: a runaway call still ends with re-prime; without it a
#: call ends before the 240 s context is full.
MAX_CALL_S_REPRIME = 3600.0
MAX_CALL_S_NO_REPRIME = 230.0


class CallSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_calls: int = Field(4, ge=1, le=1024)  # call slots: the batch size, fixed at start
    # unset: MAX_CALL_S_REPRIME with reprime, MAX_CALL_S_NO_REPRIME with hangup/slide; null: no limit
    max_call_seconds: float | None = Field(MAX_CALL_S_REPRIME, gt=0)
    # reprime: before the context is full, the call's model state is rebuilt from its prompt and
    # its latest `reprime_keep_s` of conversation (agent/calls/reprime.py); hangup: ends the call at the
    # context; slide: goes on, the prompt falling out of what the model sees
    context_policy: Literal["reprime", "hangup", "slide"] = "reprime"
    # conversation a re-prime keeps; null: what leaves a third of the context free (checked
    # against the model's context when the engine starts)
    reprime_keep_s: float | None = Field(None, gt=0)
    # rebuilds running at once (calls that started together cross the context together); each
    # holds one extra row of KV cache on the device while it runs (about 2/3 of a context)
    reprime_parallel: int = Field(4, ge=1, le=64)
    idle_timeout_s: float = Field(20.0, gt=0)  # no caller audio for this long ends the call
    retry_after_s: int = Field(5, ge=1)  # what a refusal over capacity tells the caller to wait
    # caller audio waits at most this long for the engine; older audio is dropped (and counted)
    max_latency_ms: float = Field(400.0, ge=80, le=5000)
    prefill_batch: int = Field(4, ge=1, le=64)  # calls whose prompts are prefilled in one forward
    sampling: SamplingParams = SamplingParams()  # a persona's `sampling:` overrides these per call
    barge_in: BargeInConfig = BargeInConfig()

    @model_validator(mode="after")
    def _limit_follows_policy(self):
        """An unset call limit follows the context policy (one rule, wherever the model is made)."""
        if "max_call_seconds" not in self.model_fields_set and self.context_policy != "reprime":
            object.__setattr__(self, "max_call_seconds", MAX_CALL_S_NO_REPRIME)
        return self

    def call_settings(self) -> dict:
        """These settings alone, as keyword arguments (for a model that extends this one)."""
        return {k: getattr(self, k) for k in CallSettings.model_fields}
