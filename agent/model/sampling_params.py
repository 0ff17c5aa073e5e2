"""A call's sampling settings: their one model, defaults and bounds.

The server's `sampling:` section (server/config.py), a persona's `sampling:` overrides
(agent/personas/schema.py) and the engine all use this model, so a default or a bound is
written once. On its own module so that config and persona parsing can name it without
importing torch: those run in the unit tests and the config checker, which load no model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    greedy: bool = False
    temp_audio: float = Field(0.8, ge=0, le=5)
    temp_text: float = Field(0.7, ge=0, le=5)
    topk_audio: int = Field(250, ge=0)
    topk_text: int = Field(25, ge=0)

    @property
    def samples(self) -> bool:
        return not self.greedy

    def replace(self, **changes) -> "SamplingParams":
        """These settings with `changes` (None: unchanged), validated like any other."""
        return SamplingParams.model_validate({**self.model_dump(), **{k: v for k, v in changes.items() if v is not None}})


#: the setting names (persona files, the playground's form)
SAMPLING_FIELDS = tuple(SamplingParams.model_fields)
