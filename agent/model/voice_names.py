"""The stock PersonaPlex voice names, on their own: persona checks and the unit tests name them
without importing torch (agent/model/voices.py, which loads voice files, does)."""

from __future__ import annotations

STOCK_VOICES: tuple[str, ...] = (
    *(f"NATF{i}" for i in range(4)), *(f"NATM{i}" for i in range(4)),
    *(f"VARF{i}" for i in range(5)), *(f"VARM{i}" for i in range(5)),
)
