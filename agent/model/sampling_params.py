"""A call's sampling settings, on their own so that config and persona parsing (server/config.py,
agent/personas/schema.py) can name them without importing torch: those modules run in the unit
tests and the config checker, which load no model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = False
    temp_audio: float = 0.8
    temp_text: float = 0.7
    topk_audio: int = 250
    topk_text: int = 25

    @property
    def samples(self) -> bool:
        return not self.greedy

    def replace(self, **changes) -> "SamplingParams":
        from dataclasses import replace

        return replace(self, **{k: v for k, v in changes.items() if v is not None})
