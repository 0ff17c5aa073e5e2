"""Moshi streaming state, handled as data: fresh states for a prefill, row copies, materialising.

A transformer row's whole history is the first N positions of each layer's KV cache plus its
position counters. That is what lets a prompt be prefilled in a state of its own (batch of the
starting calls only, capacity of the prompt only) and then copied into a call slot of the live
batch, touching no other row.
"""

from __future__ import annotations

from typing import Any

import torch


def streaming_states(module: torch.nn.Module) -> dict[str, Any]:
    """Name -> streaming state of `module` and its streaming children (moshi's own walk)."""
    return module.get_streaming_state()


def fresh_states(module: torch.nn.Module, batch_size: int, capacity: int,
                 device: torch.device) -> dict[str, Any]:
    """New streaming states for `module` (a moshi `StreamingTransformer`): `batch_size` rows whose
    KV caches hold `capacity` positions instead of the model's whole context.

    moshi sizes a KV cache by the attention's `context`; it is lowered only while the state is
    made. The attention mask still uses the real context, which is the same as long as no more
    than `capacity` positions are written (no ring wrap-around), as in a prefill.
    """
    from moshi.modules.transformer import StreamingMultiheadAttention

    states: dict[str, Any] = {}

    def make(name: str, mod) -> None:
        if isinstance(mod, StreamingMultiheadAttention) and mod.context is not None:
            saved = mod.context
            mod.context = min(saved, capacity)
            try:
                states[name] = mod._init_streaming_state(batch_size)
            finally:
                mod.context = saved
        else:
            states[name] = mod._init_streaming_state(batch_size)

    module._apply_named_streaming(make)
    materialize(states, device)
    return states


def copy_rows(src: dict[str, Any], dst: dict[str, Any], pairs: list[tuple[int, int, int]]) -> None:
    """Copy rows between two state sets of the same module: (src row, dst row, positions).

    The destination rows get the source rows' first `positions` KV entries and position
    counters set to `positions`; entries beyond are left as they are and count as invalid
    (moshi masks cache positions at or past a row's end offset).
    """
    for name, s in src.items():
        d = dst[name]
        kv_s, kv_d = getattr(s, "kv_cache", None), getattr(d, "kv_cache", None)
        for r_src, r_dst, n in pairs:
            if kv_s is not None and kv_d is not None:
                if n > kv_d.capacity:
                    raise ValueError("prompt longer than the KV cache")
                kv_d.cache[:, r_dst, :, :n].copy_(kv_s.cache[:, r_src, :, :n])
                if not kv_d.respect_exec_mask:
                    raise ValueError("a KV cache shared by all rows cannot take one row's positions")
                kv_d.end_offset[r_dst] = n
            for attr in ("offset", "offsets"):
                t = getattr(d, attr, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == d.batch_size:
                    t[r_dst] = n


def rewind_rows(states: dict[str, Any], rows: dict[int, int | None]) -> None:
    """Take positions back from rows: row -> how many (None: all, an empty row). What a
    rewound row wrote past its new end counts as invalid (masked) and is overwritten by its
    next positions, as after `copy_rows`."""
    for st in states.values():
        kv = getattr(st, "kv_cache", None)
        for row, k in rows.items():
            if kv is not None and kv.respect_exec_mask:
                kv.end_offset[row] = 0 if k is None else kv.end_offset[row] - k
            for attr in ("offset", "offsets"):
                t = getattr(st, attr, None)
                if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == st.batch_size:
                    t[row] = 0 if k is None else t[row] - k


def materialize(states: dict[str, Any], device: torch.device) -> int:
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

    for st in states.values():
        if st is None:
            continue
        for attr in ("exec_mask", "offset", "offsets"):
            fix(st, attr)
        cache = getattr(st, "kv_cache", None)
        if cache is not None:
            fix(cache, "cache")
            fix(cache, "end_offset")
    return replaced


def materialize_states(lm: torch.nn.Module, device: torch.device) -> int:
    """`materialize` for a model's own (live) streaming state."""
    return materialize(streaming_states(lm), device)
