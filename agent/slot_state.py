"""Copying one batch row of moshi's streaming transformer state (KV caches, positions).

This is what makes "instant answer" possible: the prompt phase's effect on the model is the
first N positions of each layer's KV cache plus the position counters, so it can be recorded
once and copied into any free row. Only the rows' own entries are touched; other calls in the
batch are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowState:
    positions: int  # how many steps the row has taken
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]  # state name -> (keys+values [2, H, N, D], end_offset)
    offsets: dict[str, torch.Tensor]  # state name -> per-row offset (scalar tensor)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() for k, _ in self.kv.values())


def _states(lm: torch.nn.Module) -> dict:
    return {name: st for name, st in lm.get_streaming_state().items() if st is not None}


def capture_row(lm: torch.nn.Module, row: int, positions: int) -> RowState:
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    offsets: dict[str, torch.Tensor] = {}
    for name, st in _states(lm).items():
        cache = getattr(st, "kv_cache", None)
        if cache is not None:
            if positions > cache.capacity:
                raise ValueError("prompt longer than the KV cache")
            end = cache.end_offset[row].clone() if cache.end_offset.numel() > 1 else cache.end_offset.clone()
            kv[name] = (cache.cache[:, row, :, :positions].clone(), end)
        for attr in ("offset", "offsets"):
            t = getattr(st, attr, None)
            if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == st.batch_size:
                offsets[f"{name}.{attr}"] = t[row].clone()
    return RowState(positions=positions, kv=kv, offsets=offsets)


def restore_row(lm: torch.nn.Module, row: int, snap: RowState) -> None:
    for name, st in _states(lm).items():
        cache = getattr(st, "kv_cache", None)
        if cache is not None and name in snap.kv:
            values, end = snap.kv[name]
            cache.cache[:, row, :, : snap.positions].copy_(values)
            if cache.end_offset.numel() > 1:
                cache.end_offset[row] = end
        for attr in ("offset", "offsets"):
            key = f"{name}.{attr}"
            if key in snap.offsets:
                getattr(st, attr)[row] = snap.offsets[key]


def materialize_states(lm: torch.nn.Module, device: torch.device) -> int:
    """Give streaming state that was created on the meta device real storage on `device`.

    With --cpu-offload, accelerate keeps offloaded layers' weights on the meta device, and moshi
    allocates each layer's streaming state (KV cache, positions) on its weights' device. Fresh
    state is all zeros except the execution masks (all ones), so it can be rebuilt exactly.
    Returns how many tensors were replaced.
    """
    replaced = 0

    def fix(obj, attr):
        nonlocal replaced
        t = getattr(obj, attr, None)
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            fill = torch.ones if attr == "exec_mask" else torch.zeros
            setattr(obj, attr, fill(t.shape, dtype=t.dtype, device=device))
            replaced += 1

    for st in _states(lm).values():
        for attr in ("exec_mask", "offset", "offsets"):
            fix(st, attr)
        cache = getattr(st, "kv_cache", None)
        if cache is not None:
            fix(cache, "cache")
            fix(cache, "end_offset")
    return replaced
