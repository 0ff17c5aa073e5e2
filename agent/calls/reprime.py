"""Calls of any length: a call's model state rebuilt from its prompt and its latest frames.

The model's context holds `context` frames (PersonaPlex: 3000, 240 s). Sliding it
(`context_policy: slide`) drops the oldest positions first, the persona prompt with them. A
re-prime instead rebuilds the call's transformer rows the way its start built them: the prompt
phase (the very plan the start used: voice prompt, silences, the call's rendered <system> text)
followed by the last `window` conversation frames, as the slot fed them, as one prefill in a
streaming state of its own (one row, like `agent.model.prefill`). It runs in chunks in the ticks'
spare time while the call goes on; frames the call steps meanwhile are appended to it; once it
has caught up, its rows are copied into the call's slot between two ticks (`copy_rows`, the copy
a start does). Only the transformer rows change: the token ring, the Mimi streams and the call's
step count carry on, so no frame is skipped or repeated and the caller's audio is consumed as
ever. What the model forgets is the oldest conversation, never the persona.

What a call keeps for it, on the host: `ColumnRing`, the token columns its slot fed (17 per
frame) for the last `context` frames, int16: 3000 x 17 x 2 B = 100 KiB per call on PersonaPlex.

When (`ReprimeConfig`): a rebuild starts `lead` frames before its deadline (the context less
`guard` frames), and swaps in at the first quiet moment once caught up (the agent's text stream
padding, the caller silent), or at the deadline. Up to `reprime_parallel` rebuilds run at once
(each an extra row of KV cache on the device), the most urgent calls first. A call that reaches the context limit with no
rebuild swapped in slides meanwhile (warned, counted, never hung up); its rebuild carries on, or
starts over, and swaps in as soon as it has caught up.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import structlog
import torch

from agent.model.engine import Engine, SlotOutput
from agent.model.generator import Phase, PromptPlan, TokenGenerator
from agent.model.prompt import SILENCE_FRAMES, TEXT_PAD
from agent.model.slot_state import copy_rows, fresh_states, rewind_rows
from agent.timebase import FRAME_S, NUM_STREAMS, frames_for

log = structlog.get_logger(__name__)

GUARD_FRAMES = 4  # a deadline swap happens this many frames before the context is full
MIN_PROMPT_STEPS = 2 * SILENCE_FRAMES + 1  # the shortest prompt phase (no voice, no text)
QUIET_PAD_FRAMES = 2  # agent text PAD this many frames in a row: the agent is not mid-word
HOLD_LAG = 8  # a caught-up rebuild waiting for a quiet moment lets this many frames gather
MIN_CHUNK = 4  # positions: a smaller forward is mostly fixed cost, spent better in a later tick
SILENT_DBFS = -45.0  # caller frames quieter than this are silence where no VAD runs


class ReprimeConfigError(ValueError):
    """`reprime_keep_s` (or the model's context) leaves no room for a re-prime."""


@dataclass(frozen=True)
class ReprimeConfig:
    """Where in the context a call is re-primed, in model frames (positions).

    `keep_frames` None: keep what leaves about a third of the context free after a rebuild, so
    rebuilds are rare (PersonaPlex: one every minute or more). `lead_frames` 0: a twelfth of the
    context (20 s on PersonaPlex), at least 16: time to build and to wait for a quiet moment.
    """

    context: int
    keep_frames: int | None = None
    lead_frames: int = 0
    guard_frames: int = GUARD_FRAMES

    def __post_init__(self) -> None:
        if self.lead_frames <= 0:
            object.__setattr__(self, "lead_frames", max(16, self.context // 12))
        room = self.max_window(MIN_PROMPT_STEPS)
        if room < 1:
            raise ReprimeConfigError(f"the model's {self.context}-frame context is too small to re-prime calls; "
                                     "use engine.context_policy slide or hangup")
        if self.keep_frames is not None and not 0 < self.keep_frames <= room:
            raise ReprimeConfigError(
                f"engine.reprime_keep_s = {self.keep_frames * FRAME_S:g} s ({self.keep_frames} frames) does not "
                f"fit the model's {self.context}-frame ({self.context * FRAME_S:g} s) context with a prompt and the "
                f"re-prime's margins: at most {room * FRAME_S:.1f} s, less the longest persona prompt phase")

    @classmethod
    def from_seconds(cls, context: int, keep_s: float | None) -> "ReprimeConfig":
        return cls(context, frames_for(keep_s) if keep_s else None)

    @property
    def limit(self) -> int:
        """Position at which the context is full (where `slide` and `hangup` act)."""
        return self.context - 1

    @property
    def deadline(self) -> int:
        """Position from which a caught-up rebuild swaps in, quiet or not."""
        return self.limit - self.guard_frames

    @property
    def start_at(self) -> int:
        """Position at which a call's rebuild starts."""
        return self.deadline - self.lead_frames

    def max_window(self, prompt_steps: int) -> int:
        """The most frames a call with this prompt may keep: after a rebuild (which may have
        caught up to lead + guard frames) at least `lead` frames are left before the next starts."""
        return self.start_at - 2 * self.lead_frames - self.guard_frames - prompt_steps

    def window_for(self, prompt_steps: int) -> int:
        """Conversation frames a call with this prompt keeps; negative: it cannot be re-primed."""
        want = self.keep_frames if self.keep_frames is not None else self.context - self.context // 3 - prompt_steps
        most = self.max_window(prompt_steps)
        return most if most < 0 else max(0, min(want, most))


class ColumnRing:
    """The last `capacity` token columns a call's slot fed, on the host, oldest overwritten.

    Indexed by column number since the call went live (`count` columns appended so far)."""

    def __init__(self, capacity: int, dtype: np.dtype = np.dtype(np.int16)):
        self.capacity = capacity
        self.buf = np.zeros((capacity, NUM_STREAMS), dtype=dtype)
        self.count = 0

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes)

    def append(self, column: np.ndarray) -> None:
        self.buf[self.count % self.capacity] = column
        self.count += 1

    def get(self, start: int, stop: int) -> np.ndarray:
        """Columns start..stop-1 ([n, 17]); they must still be in the ring."""
        if not (self.count - self.capacity <= start <= stop <= self.count):
            raise IndexError(f"columns {start}..{stop} not held (have {self.count - self.capacity}..{self.count})")
        return self.buf[np.arange(start, stop) % self.capacity]


def column_dtype(generator: TokenGenerator) -> np.dtype:
    """int16 when every token id fits (PersonaPlex: text 32000, audio 2048), else int32."""
    return np.dtype(np.int16 if max(generator.text_card, generator.card) < np.iinfo(np.int16).max else np.int32)


@dataclass
class CallHistory:
    """What one call keeps to be re-primed: its prompt plan, its fed columns, its quiet state."""

    plan: PromptPlan
    window: int  # conversation frames a rebuild keeps (negative: this call cannot be re-primed)
    ring: ColumnRing
    log: Any  # the call's structlog logger (call id bound)
    caller_silent: Callable[[], bool] | None = None  # the caller's VAD; None: judged by frame level
    reprimes: list[dict] = field(default_factory=list)
    pad_run: int = 0  # agent text frames in a row that were PAD
    caller_loud: bool = False  # the last caller frame (judged only while a rebuild waits)
    sliding: bool = False  # reached the context limit with no rebuild swapped in

    @property
    def prompt_steps(self) -> int:
        return self.plan.schedule.steps

    def quiet(self) -> bool:
        if self.pad_run < QUIET_PAD_FRAMES:
            return False
        return self.caller_silent() if self.caller_silent is not None else not self.caller_loud


class RebuildOverflow(RuntimeError):
    """A rebuild fell so far behind its call that its state would wrap around."""

    def __init__(self, message: str, rebuild: "Rebuild"):
        super().__init__(message)
        self.rebuild = rebuild


class RebuildBatch:
    """Rows of rebuilds in one streaming state: one forward advances all of them.

    Each forward feeds every row the same number of positions (`n`); a row with fewer inputs
    waiting takes them, then padding, and is rewound past the padding after the forward
    (`slot_state.rewind_rows`): attention is causal, so padding after a row's real inputs never
    reaches them, and rewound positions count as empty and are overwritten later. So rebuilds
    of different lengths, started at different times, share one forward per chunk (per-op cost
    dominates a forward on CPU and a launch-bound GPU alike)."""

    def __init__(self, generator: TokenGenerator, rows: int, capacity: int):
        self.generator = generator
        self.capacity = capacity
        self.members: list[Rebuild | None] = [None] * rows
        self.states = fresh_states(generator.lm.transformer, rows, capacity, generator.device)

    @property
    def free_row(self) -> int | None:
        return next((r for r, m in enumerate(self.members) if m is None), None)

    @property
    def empty(self) -> bool:
        return all(m is None for m in self.members)

    def join(self, rb: "Rebuild") -> int:
        row = self.free_row
        if row is None:
            raise RuntimeError("no free rebuild row")
        rewind_rows(self.states, {row: None})  # a fresh row: no positions
        self.members[row] = rb
        return row

    def leave(self, rb: "Rebuild") -> None:
        self.members[rb.row] = None
        rewind_rows(self.states, {rb.row: None})

    @torch.no_grad()
    def advance(self, n: int, only: list["Rebuild"] | None = None) -> int:
        """Feed up to `n` waiting positions to each rebuild in `only` (default all) in one
        forward; returns the positions the forward ran (0: nothing to do)."""
        want = [rb for rb in (only if only is not None else self.members) if rb is not None and rb.lag > 0]
        if not want:
            return 0
        for rb in want:
            if rb.target > rb.capacity:  # (its oldest columns may be gone from the ring too)
                raise RebuildOverflow(f"rebuild needs {rb.target} positions, holds {rb.capacity}", rb)
        top = max(rb.done for rb in self.members if rb is not None)
        n = max(1, min(n, max(rb.lag for rb in want), self.capacity - top))  # no row wraps around
        gen = self.generator
        x = torch.zeros(len(self.members), n, gen.lm.dim, device=gen.device, dtype=self._dtype())
        pads = {}
        for row, rb in enumerate(self.members):
            m = min(rb.lag, n) if rb is not None and rb in want else 0
            if m:
                x[row, :m] = rb.inputs(rb.done, rb.done + m)
            pads[row] = n - m
        transformer = gen.lm.transformer
        live = transformer.get_streaming_state()
        transformer.set_streaming_state(self.states)
        try:
            transformer(x)
        finally:
            transformer.set_streaming_state(live)
        rewind_rows(self.states, {row: k for row, k in pads.items() if k})
        for rb in want:
            rb.done += min(rb.lag, n)
            rb.chunks += 1
        return n

    def _dtype(self) -> torch.dtype:
        return next(self.generator.lm.transformer.parameters()).dtype


class Rebuild:
    """One call's prompt phase plus its last frames, as a row of a `RebuildBatch` (its own
    one-row batch when none is given)."""

    def __init__(self, generator: TokenGenerator, slot: int, history: CallHistory, lead: int,
                 batch: RebuildBatch | None = None):
        self.generator = generator
        self.slot = slot
        self.history = history
        ring = history.ring
        self.first = max(0, ring.count - max(0, history.window))  # first conversation column kept
        self.kept_at_start = ring.count - self.first
        self.steps = history.prompt_steps
        # frames the call may step while this runs: what the deadline (and one lead more, for a
        # rebuild that starts late or carries on past a missed deadline) allows
        self.capacity = self.steps + self.kept_at_start + 2 * lead + GUARD_FRAMES + 1
        self.started = time.monotonic()
        self.chunks = 0
        self.done = 0
        dev = generator.device
        plan = history.plan
        cols = torch.cat([plan.columns, generator.final_prompt_column(plan)[None]])  # [S, 17]
        with torch.no_grad():
            x = generator.embed(cols.T[None].to(dev))  # [1, S, dim]
            emb = plan.schedule.embeddings
            if emb is not None:
                e = min(emb.shape[0], self.steps)
                x[0, :e] = emb[:e].to(device=dev, dtype=x.dtype)
        self.prompt_x = x[0]
        self.batch = batch if batch is not None else RebuildBatch(generator, 1, self.capacity)
        if self.capacity > self.batch.capacity:
            raise RebuildOverflow(f"rebuild needs up to {self.capacity} positions, its batch holds "
                                  f"{self.batch.capacity}", self)
        self.row = self.batch.join(self)

    @property
    def target(self) -> int:
        """Positions the slot holds now, as the rebuild will have them: prompt plus kept frames."""
        return self.steps + self.history.ring.count - self.first

    @property
    def lag(self) -> int:
        return self.target - self.done

    @property
    def kept(self) -> int:
        return self.history.ring.count - self.first

    def inputs(self, a: int, b: int) -> torch.Tensor:
        """Embeddings of positions a..b-1 ([b - a, dim]): prompt steps, then conversation columns."""
        gen = self.generator
        pieces = []
        if a < self.steps:
            pieces.append(self.prompt_x[a:min(b, self.steps)])
        if b > self.steps:
            lo = self.first + max(a, self.steps) - self.steps
            cols = torch.from_numpy(self.history.ring.get(lo, self.first + b - self.steps).astype(np.int64))
            pieces.append(gen.embed(cols.T[None].to(gen.device))[0])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def advance(self, n: int) -> None:
        """Run the next `n` positions of this rebuild alone (at most what the call has fed)."""
        self.batch.advance(n, only=[self])

    def install(self) -> None:
        """Copy the rebuilt row into the call's slot (between two ticks, caught up)."""
        if self.lag:
            raise RuntimeError("rebuild not caught up")
        copy_rows(self.batch.states, self.generator.lm.transformer.get_streaming_state(),
                  [(self.row, self.slot, self.done)])
        self.generator.rebased(self.slot, self.done)
        self.batch.leave(self)
        self.prompt_x = None

    def abandon(self) -> None:
        self.batch.leave(self)
        self.prompt_x = None


@dataclass(frozen=True)
class Reprimed:
    """A rebuild swapped in (the `reprime` log event says the same)."""

    slot: int
    frame: int  # agent frames the call had produced: where the swap is in its recording
    window: int  # conversation frames kept
    position_before: int
    positions: int  # what the slot holds after: prompt phase plus window
    build_s: float
    chunks: int
    caught_up: int  # frames the call stepped while the rebuild ran
    swap: str  # "quiet" or "deadline"


class _Cost:
    """A rebuild forward's time as fixed + per-position cost, from recent chunks: the least
    times seen (a cold or preempted chunk must not make every later one needlessly small)."""

    def __init__(self, per_hint: Callable[[], float] | None):
        self.per_hint = per_hint
        self.samples: list[tuple[int, float]] = []

    def observe(self, n: int, dt: float) -> None:
        self.samples = (self.samples + [(n, dt)])[-16:]

    @property
    def fixed(self) -> float:
        """The least time a small forward took (0 until one was seen: then `per` covers it)."""
        return min((dt for n, dt in self.samples if n < 16), default=0.0)

    @property
    def per(self) -> float:
        a = self.fixed
        big = [(dt - a) / n for n, dt in self.samples if n >= 16]
        if big:
            return max(min(big), 1e-7)
        return self.per_hint() if self.per_hint else 2e-4

    def fits(self, budget: float) -> int:
        """Positions whose forward fits in `budget` seconds (0: not even a small one)."""
        room = budget - self.fixed
        return int(room / self.per) if room > 0 else 0


class ReprimeLane:
    """Owned by the scheduler (or the offline loop); every method on the engine thread.

    Up to `parallel` rebuilds run at once, as rows of one `RebuildBatch` (one forward per chunk
    for all of them; the batch holds `parallel` rows of KV cache on the device while any rebuild
    runs, freed when none does): calls that started together cross the context together. A
    caught-up rebuild waiting for a quiet moment gives way, swapping in at once, when another
    call is due and no row is free."""

    def __init__(self, engine: Engine, cfg: ReprimeConfig, cost_hint: Callable[[], float] | None = None,
                 on_reprime: Callable[[Reprimed], None] | None = None,
                 on_fallback: Callable[[int], None] | None = None, parallel: int = 4):
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.engine = engine
        self.cfg = cfg
        self.parallel = parallel
        self.on_reprime = on_reprime
        self.on_fallback = on_fallback  # (slot): a call reached the context limit un-reprimed
        self._cost = _Cost(cost_hint)
        self._calls: dict[int, CallHistory] = {}
        self._active: dict[int, Rebuild] = {}
        self._batch: RebuildBatch | None = None
        self._dtype = column_dtype(engine.generator)
        self.reprimes = 0
        self.fallbacks = 0

    # -- calls --------------------------------------------------------------------------------
    def track(self, slot: int, plan: PromptPlan, call_log: Any = None,
              caller_silent: Callable[[], bool] | None = None,
              reprimes: list[dict] | None = None) -> CallHistory:
        """Keep what `slot`'s call needs to be re-primed, from its first frame on."""
        call_log = call_log or log
        window = self.cfg.window_for(plan.schedule.steps)
        if window < 0:
            call_log.warning("reprime_unavailable", prompt_steps=plan.schedule.steps, context=self.cfg.context)
        elif self.cfg.keep_frames is not None and window < self.cfg.keep_frames:
            call_log.warning("reprime_window_shortened", window=window, keep_frames=self.cfg.keep_frames,
                             prompt_steps=plan.schedule.steps)
        h = CallHistory(plan, window, ColumnRing(self.cfg.context, self._dtype), call_log, caller_silent,
                        reprimes if reprimes is not None else [])
        self._calls[slot] = h
        return h

    def forget(self, slot: int) -> None:
        self._calls.pop(slot, None)
        rb = self._active.pop(slot, None)
        if rb is not None:
            rb.abandon()
            self._drop_empty_batch()

    def clear(self) -> None:
        self._calls.clear()
        self._active.clear()
        self._batch = None

    def history(self, slot: int) -> CallHistory | None:
        return self._calls.get(slot)

    @property
    def rebuilding(self) -> list[int]:
        """The slots whose rebuilds are in progress."""
        return list(self._active)

    def observe(self, slot: int, out: SlotOutput, caller: np.ndarray | None) -> None:
        """A frame `slot` produced: keep the column it fed (live steps: the prompt phase is
        replayed from its plan) and what a quiet moment is judged by."""
        h = self._calls.get(slot)
        if h is None or out.first or out.fed is None:
            return
        h.ring.append(out.fed)
        h.pad_run = h.pad_run + 1 if out.text_token == TEXT_PAD else 0
        if h.caller_silent is None and slot in self._active:
            level = float(np.sqrt(np.mean(np.square(caller, dtype=np.float64)))) if caller is not None else 0.0
            h.caller_loud = level > 10 ** (SILENT_DBFS / 20)

    # -- the spare time ---------------------------------------------------------------------
    def run(self, deadline: float | None) -> None:
        """Advance re-primes until `deadline` (monotonic seconds; None: no limit, offline) and swap
        in caught-up rebuilds at a quiet moment or at their deadline. Call it between two ticks,
        after every step of the tick."""
        if not self._calls:
            return
        self._check_limits()
        for slot in [s for s in self._active if self.engine.phase(s) is not Phase.LIVE]:
            self.forget(slot)
        waiting = self._begin()
        if not self._active:
            return
        swaps = {slot: self._swap_kind(rb, make_way=waiting > 0) for slot, rb in self._active.items()}
        want = [rb for rb in self._active.values()
                if rb.lag > 0 and (swaps[rb.slot] is not None or rb.lag > HOLD_LAG)]
        if want:
            self._advance(want, deadline, make_way=waiting > 0)
        for slot, rb in list(self._active.items()):
            if rb.lag == 0 and swaps[slot] is not None:
                self._swap(rb, swaps[slot])
                waiting -= 1
        if waiting > 0:
            self._begin()
        self._drop_empty_batch()

    def _swap_kind(self, rb: Rebuild, make_way: bool) -> str | None:
        """When `rb` may swap in once caught up: "quiet" (a pause), "deadline" (the context is
        nearly full, or another call needs its row), or None (not yet)."""
        pos = self.engine.position(rb.slot)
        if rb.history.quiet():
            return "quiet"
        if pos >= self.cfg.deadline or (make_way and rb.lag <= HOLD_LAG):
            return "deadline"
        return None

    def _urgent(self, rb: Rebuild) -> bool:
        return rb.history.sliding or self.cfg.deadline - self.engine.position(rb.slot) <= self.cfg.lead_frames // 2

    def _pace(self, rb: Rebuild, make_way: bool = False) -> int:
        """Positions a tick that catch `rb` up by its call's context limit (the call adds one a
        tick meanwhile), or within a quarter of the lead when another call waits for its row;
        all of them once it slides."""
        left = self.cfg.limit - self.engine.position(rb.slot)
        if make_way:
            left = min(left, max(1, self.cfg.lead_frames // 4))
        return rb.lag if rb.history.sliding or left <= 1 else -(-rb.lag // left) + 1

    def _advance(self, want: list[Rebuild], deadline: float | None, make_way: bool = False) -> None:
        """One forward for the rebuilds that want work, as long as the tick's spare time allows
        (an urgent rebuild gets a small slice even when there is none)."""
        if deadline is None:
            fit = math.inf
        else:
            # spare time first; an urgent rebuild also gets the pace that finishes it before its
            # call's limit, spare time or not (a late tick rather than a call that slides)
            fit = self._cost.fits(deadline - time.monotonic())
            fit = max([fit] + [self._pace(rb, make_way) for rb in want if make_way or self._urgent(rb)])
            if fit < min(MIN_CHUNK, max(rb.lag for rb in want)):
                return
        assert self._batch is not None
        t0 = time.monotonic()
        try:
            n = self._batch.advance(int(min(fit, max(rb.lag for rb in want))), only=want)
        except RebuildOverflow as exc:
            rb = exc.rebuild  # (its call stays tracked: a new rebuild starts when one is due)
            rb.history.log.warning("reprime_abandoned", error=str(exc))
            del self._active[rb.slot]
            rb.abandon()
            return
        if n:
            self._cost.observe(n, time.monotonic() - t0)

    def _drop_empty_batch(self) -> None:
        if self._batch is not None and self._batch.empty:
            self._batch = None  # its KV rows are freed while no call needs a rebuild

    def _check_limits(self) -> None:
        for slot, h in self._calls.items():
            if h.sliding or h.window < 0 or self.engine.phase(slot) is not Phase.LIVE:
                continue  # (a call that cannot be re-primed was warned at its start; it slides)
            pos = self.engine.position(slot)
            if pos >= self.cfg.limit:
                h.sliding = True
                self.fallbacks += 1
                h.log.warning("reprime_missed_sliding", position=pos, window=h.window,
                              rebuilding=slot in self._active)
                if self.on_fallback is not None:
                    self.on_fallback(slot)

    def _begin(self) -> int:
        """Start rebuilds for due calls while rows are free, the most urgent first; returns how
        many due calls are left waiting for a row."""
        due = sorted(((self.engine.position(s), s) for s, h in self._calls.items()
                      if s not in self._active and h.window >= 0 and self.engine.phase(s) is Phase.LIVE
                      and self.engine.position(s) >= self.cfg.start_at), reverse=True)
        for k, (_, slot) in enumerate(due):
            if len(self._active) >= self.parallel:
                return len(due) - k
            if self._batch is None:
                self._batch = RebuildBatch(self.engine.generator, self.parallel, self.cfg.context)
            try:
                self._active[slot] = Rebuild(self.engine.generator, slot, self._calls[slot], self.cfg.lead_frames,
                                             self._batch)
            except Exception:
                self._calls[slot].log.exception("reprime_failed")
                self._calls[slot].window = -1  # not again for this call: it slides at the limit
        return 0

    def _swap(self, rb: Rebuild, swap: str) -> None:
        h = rb.history
        pos = self.engine.position(rb.slot)
        kept, caught_up = rb.kept, h.ring.count - rb.kept_at_start - rb.first
        rb.install()
        del self._active[rb.slot]
        h.sliding = False
        self.reprimes += 1
        info = Reprimed(slot=rb.slot, frame=h.ring.count + 1, window=kept, position_before=pos,
                        positions=rb.done, build_s=time.monotonic() - rb.started, chunks=rb.chunks,
                        caught_up=caught_up, swap=swap)
        h.reprimes.append({"frame": info.frame, "window": kept, "swap": swap})
        h.log.info("reprime", position=pos, positions=info.positions, frame=info.frame, window_frames=kept,
                   build_ms=round(1000 * info.build_s, 1), chunks=info.chunks, caught_up_frames=caught_up,
                   swap=swap)
        if self.on_reprime is not None:
            self.on_reprime(info)


__all__ = ["CallHistory", "ColumnRing", "Rebuild", "RebuildBatch", "ReprimeConfig", "ReprimeConfigError", "ReprimeLane",
           "Reprimed"]
