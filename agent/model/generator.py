"""Batched, full-duplex PersonaPlex token generation on moshi's `LMModel`.

Call slots are rows of one batch stepped together (one transformer forward per 80 ms frame for
all calls). Each row has its own position: a slot can start while its neighbours talk, be freed,
and be reused, without changing what the other rows produce.

Timing. Step `o` of a slot feeds token column `o` to the transformer and predicts column `o+1`.
A live step writes the caller's codes for the current frame into column `o` (codebook 0) and
`o+1` (delayed codebooks) *before* feeding column `o`, so the caller's frame is consumed in the
step it arrives (as upstream moshi's `LMGen` does). The PersonaPlex reference consumes it one step
later; the conditional structure is the same, so live output `i` here equals the reference's live
output `i+1`, and the last prompt step here emits the reference's first live output.

Prompt phase. Every input of the prompt phase is known in advance (`PromptSchedule`), so all of
it but its final step is normally run as one transformer forward (`agent.model.prefill`); `plan`
computes, off the engine thread, the token columns those steps feed and the token ring they leave
behind, and `install` puts a prefilled row in place. The final prompt step then runs in the
ordinary batched step and emits the call's first frame. `start` keeps the step-by-step prompt
phase: it is the reference the prefill path is tested against.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

import torch

from agent.model.prompt import PromptSchedule
from agent.model.sampling import SamplingParams, StepNoise, draw_noise, noise_per_step, sample_rows
from agent.model.slot_state import materialize_states
from agent.timebase import AGENT, CALLER, NUM_STREAMS

RING = 4  # token ring length: the reference's cache layout (voice files store a ring of 4)


class Phase(enum.Enum):
    FREE = "free"
    PROMPT = "prompt"
    LIVE = "live"


@dataclass
class SlotState:
    phase: Phase = Phase.FREE
    offset: int = 0  # column fed at this slot's next step
    schedule: PromptSchedule | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    rng: torch.Generator | None = None
    # steps the model state no longer holds: `offset` keeps counting (the token ring follows
    # it) while a re-prime (`agent.calls.reprime`) rebuilds the transformer rows shorter
    forgotten: int = 0

    @property
    def position(self) -> int:
        """Positions the slot's transformer rows hold: what fills the context."""
        return self.offset - self.forgotten


@dataclass(frozen=True)
class PromptPlan:
    """What a slot's prompt phase does, minus the model: computed off the engine thread.

    `columns[o]` is the token column step `o` feeds (rows before the voice embeddings end are
    unused: those steps feed `schedule.embeddings`); `cache`/`provided` are the token ring after
    the `steps` prefilled steps, i.e. just before the final prompt step.
    """

    schedule: PromptSchedule
    columns: torch.Tensor  # [steps, 17] int64
    cache: torch.Tensor  # [17, RING] int64
    provided: torch.Tensor  # [17, RING] bool

    @property
    def steps(self) -> int:
        """Steps run by the prefill: all of the prompt phase but its final step."""
        return self.schedule.steps - 1


@dataclass
class StepOutput:
    """Tokens of the frame each slot completed in this step, [B, 17] on CPU.

    `emitting` lists the rows whose frame is conversation output: live rows and rows that just
    finished their prompt phase (their frame is the call's first). `finished_prompt` lists the
    latter. `fed` is the token column each row fed this step ([B, 17] on CPU, brought over with
    `tokens` in one copy): what a re-prime replays.
    """

    tokens: torch.Tensor
    fed: torch.Tensor
    emitting: list[int]
    finished_prompt: list[int]


class TokenGenerator:
    def __init__(self, lm: torch.nn.Module, batch_size: int):
        self.lm = lm
        self.batch_size = batch_size
        self.device = lm.device
        delays = list(lm.delays)
        if len(delays) != NUM_STREAMS or max(delays) > RING - 3:
            raise ValueError(f"unsupported delays {delays}")
        self.delays = torch.tensor(delays, device=self.device, dtype=torch.long)
        self.initial = lm._get_initial_token()[0, :, 0].to(self.device)  # [17]
        # host copies for `plan`, which runs on other threads and must not touch the device
        self._delays_l = [int(d) for d in delays]
        self._initial_l = [int(t) for t in self.initial.cpu()]
        self._ungenerated = int(lm.ungenerated_token_id)
        B = batch_size
        self.cache = torch.full((B, NUM_STREAMS, RING), lm.ungenerated_token_id, dtype=torch.long,
                                device=self.device)
        self.provided = torch.zeros((B, NUM_STREAMS, RING), dtype=torch.bool, device=self.device)
        self.slots = [SlotState() for _ in range(B)]
        self._exec_mask: torch.Tensor | None = None
        self._exec_rows: tuple[int, ...] = ()
        self.text_card = int(lm.text_card)
        self.card = int(lm.card)
        self._streaming = lm.streaming(B)
        materialize_states(lm, self.device)  # offloaded layers (--cpu-offload) start on meta

    def close(self) -> None:
        """Leave streaming mode so the model can serve another generator."""
        self._streaming.close()

    # -- slot lifecycle -------------------------------------------------------------------
    def free_rows(self) -> list[int]:
        return [b for b, s in enumerate(self.slots) if s.phase is Phase.FREE]

    def new_rng(self, sampling: SamplingParams, seed: int | None) -> torch.Generator | None:
        if sampling.greedy:
            return None
        rng = torch.Generator(device=self.device)
        rng.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return rng

    def reset_row(self, row: int) -> None:
        """Clear `row`'s model state (KV positions, offsets); the row must be free."""
        if self.slots[row].phase is not Phase.FREE:
            raise RuntimeError(f"slot {row} is busy")
        mask = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        mask[row] = True
        self.lm.reset_streaming(mask)
        self._exec_mask = None

    def start(self, row: int, schedule: PromptSchedule, sampling: SamplingParams,
              seed: int | None = None) -> None:
        """Begin a call in `row` with its prompt phase stepped one frame per step (the reference
        path; calls normally start through `agent.model.prefill`)."""
        self.reset_row(row)
        self.cache[row] = self._ungenerated
        self.provided[row] = False
        # Columns before a stream's delay has elapsed hold its initial token (forced).
        for k, d in enumerate(self._delays_l):
            for c in range(d + 1):
                self.cache[row, k, c] = self.initial[k]
                self.provided[row, k, c] = True
        self.slots[row] = SlotState(Phase.PROMPT, 0, schedule, sampling, self.new_rng(sampling, seed))

    def plan(self, schedule: PromptSchedule) -> PromptPlan:
        """The token side of the prompt phase's first `steps - 1` steps, without the model.

        It replays exactly what `step` does to a row's token ring during those steps: every
        token they write is forced by the schedule, so the model's output cannot change them.
        Pure Python on small lists (about a millisecond for 250 steps); thread-safe.
        """
        delays, initial = self._delays_l, self._initial_l
        items = schedule.items.tolist()
        steps, n_emb = schedule.steps, schedule.num_embeddings
        restore = schedule.restore_cache.tolist() if schedule.restore_cache is not None else None
        cache = [[self._ungenerated] * RING for _ in range(NUM_STREAMS)]
        provided = [[False] * RING for _ in range(NUM_STREAMS)]
        for k, d in enumerate(delays):
            for c in range(d + 1):
                cache[k][c] = initial[k]
                provided[k][c] = True
        columns = [[0] * NUM_STREAMS for _ in range(steps - 1)]
        for o in range(steps - 1):
            if o + 1 < steps:
                col = items[o + 1]
                for k, d in enumerate(delays):
                    p = (o + 1 + d) % RING
                    cache[k][p] = col[k]
                    provided[k][p] = True
            fed, tgt = o % RING, (o + 1) % RING
            if o >= n_emb:
                columns[o] = [initial[k] if o <= d else cache[k][fed] for k, d in enumerate(delays)]
                # everything the step would sample is forced, so its commit leaves the ring as is
                for k in range(AGENT.stop):  # text and the agent's codebooks
                    if not provided[k][tgt]:
                        raise AssertionError(f"prompt step {o} would sample stream {k}: not a forced phase")
            for k in range(NUM_STREAMS):
                provided[k][fed] = False
            if restore is not None and o + 1 == n_emb:
                cache = [list(r) for r in restore]
                provided = [[True] * RING for _ in range(NUM_STREAMS)]
        return PromptPlan(schedule=schedule, columns=torch.tensor(columns, dtype=torch.long).view(-1, NUM_STREAMS),
                          cache=torch.tensor(cache, dtype=torch.long),
                          provided=torch.tensor(provided, dtype=torch.bool))

    def final_prompt_column(self, plan: PromptPlan) -> torch.Tensor:
        """The column the final prompt step feeds ([17]): the one prompt step a prefill leaves
        to the live batch, known from the plan's token ring. A re-prime replays the whole prompt
        phase, this step included."""
        o = plan.steps
        return torch.tensor([self._initial_l[k] if o <= d else int(plan.cache[k, o % RING])
                             for k, d in enumerate(self._delays_l)], dtype=torch.long)

    def rebased(self, row: int, positions: int) -> None:
        """`row`'s transformer rows now hold `positions` positions (a re-prime copied them in);
        its step count and token ring carry on unchanged."""
        s = self.slots[row]
        if s.phase is not Phase.LIVE:
            raise RuntimeError(f"slot {row} is not live")
        s.forgotten = s.offset - positions

    @torch.no_grad()
    def feed_columns(self, row: int, columns: torch.Tensor) -> None:
        """Step `row`'s transformer through these token columns ([T, 17]) one position per
        forward, as live steps feed them; the token ring, the slot's step count and other rows
        are left as they are. The frame-by-frame reference a re-prime is tested against
        (`tests/engine/test_reprime.py`)."""
        self._sync_exec_mask([row])
        for col in columns.to(self.device):
            x = self.embed(col.view(1, NUM_STREAMS, 1).expand(self.batch_size, NUM_STREAMS, 1))
            self.lm.transformer(x)

    def install(self, row: int, plan: PromptPlan, sampling: SamplingParams,
                rng: torch.Generator | None) -> None:
        """Make `row` a call whose prompt phase was prefilled: its model state must already hold
        the prefill's positions (`agent.model.prefill` copies them); the next step is the final prompt
        step, which emits the call's first frame. `rng` must have skipped the prefilled steps'
        draws (`prepared_rng`)."""
        self.cache[row] = plan.cache.to(self.device)
        self.provided[row] = plan.provided.to(self.device)
        self.slots[row] = SlotState(Phase.PROMPT, plan.steps, plan.schedule, sampling, rng)
        self._exec_mask = None

    def prepared_rng(self, sampling: SamplingParams, seed: int | None, steps: int) -> torch.Generator | None:
        """A call's random generator advanced past `steps` prompt steps (what a prefill skips),
        so a seeded call gives the same output whether its prompt was stepped or prefilled.
        An unseeded call (every real call) starts from a random point anyway: nothing to skip.
        Thread-safe and independent of the batch: build it off the engine thread."""
        rng = self.new_rng(sampling, seed)
        if rng is None or seed is None:
            return rng
        if self.device.type == "cpu":
            # CPU generators consume by element count: one bulk draw equals the per-step draws
            left = noise_per_step(sampling, self.text_card, self.card) * steps
            while left > 0:
                n = min(left, 1 << 20)
                torch.empty(n).exponential_(1, generator=rng)
                left -= n
        else:
            for _ in range(steps):
                draw_noise(rng, sampling, self.text_card, self.card, self.device)
        return rng

    def free(self, row: int) -> None:
        self.slots[row] = SlotState()
        self._exec_mask = None

    # -- stepping -------------------------------------------------------------------------
    def stepping_rows(self, only: set[int] | None = None) -> list[int]:
        """Rows that take a step now: busy, and in `only` if given."""
        return [b for b, s in enumerate(self.slots)
                if s.phase is not Phase.FREE and (only is None or b in only)]

    def _sync_exec_mask(self, rows: list[int]) -> torch.Tensor:
        # compared as a tuple on the host: no device sync on the hot path
        key = tuple(rows)
        if self._exec_mask is None or self._exec_rows != key:
            mask = torch.zeros(self.batch_size, dtype=torch.bool)
            mask[rows] = True
            self._exec_mask = mask.to(self.device)
            self._exec_rows = key
            self.lm.set_exec_mask(self._exec_mask)
        return self._exec_mask

    def embed(self, columns: torch.Tensor) -> torch.Tensor:
        """Sum of token embeddings of columns [B, 17, T] -> [B, T, dim], in
        `LMModel.forward_text`'s order (bit-exactness)."""
        lm = self.lm
        x = None
        for cb in range(lm.num_audio_codebooks):
            e = lm.emb[cb](columns[:, cb + lm.audio_offset])
            x = e if x is None else x + e
        t = lm.text_emb(columns[:, 0])
        return t if x is None else x + t

    @torch.no_grad()
    def step(self, caller_codes: dict[int, torch.Tensor], only: set[int] | None = None) -> StepOutput:
        """Advance busy slots by one frame (all, or those in `only`); other rows do not move.

        `caller_codes[row]` ([8]) is needed for each live row that steps.
        """
        B, dev, lm = self.batch_size, self.device, self.lm
        rows = self.stepping_rows(only)
        active = self._sync_exec_mask(rows)
        stepping = set(rows)
        offsets_l = [s.offset for s in self.slots]
        offsets = torch.tensor(offsets_l, device=dev)

        # 1. Forced tokens: prompt items (column o+1) and the caller's codes (column o).
        writes = torch.full((B, NUM_STREAMS), -1, dtype=torch.long)
        base = list(offsets_l)
        embed_rows: list[tuple[int, torch.Tensor]] = []
        for b, s in enumerate(self.slots):
            if b not in stepping:
                continue
            if s.phase is Phase.PROMPT:
                sch = s.schedule
                assert sch is not None
                if s.offset + 1 < sch.steps:
                    writes[b] = sch.items[s.offset + 1]
                    base[b] = s.offset + 1
                if s.offset < sch.num_embeddings:
                    embed_rows.append((b, sch.embeddings[s.offset]))
            elif s.phase is Phase.LIVE:
                writes[b, CALLER] = caller_codes[b].to(torch.long).cpu()
        writes = writes.to(dev)
        pos = (torch.tensor(base, device=dev)[:, None] + self.delays[None, :]) % RING  # [B, 17]
        wmask = writes >= 0
        old = self.cache.gather(2, pos[..., None])[..., 0]
        self.cache.scatter_(2, pos[..., None], torch.where(wmask, writes, old)[..., None])
        oldp = self.provided.gather(2, pos[..., None])[..., 0]
        self.provided.scatter_(2, pos[..., None], (oldp | wmask)[..., None])

        # 2. Feed column o (initial tokens where the delay has not elapsed, and on free rows).
        fed = (offsets % RING)
        column = self.cache.gather(2, fed[:, None, None].expand(B, NUM_STREAMS, 1))[..., 0]
        is_init = (offsets[:, None] <= self.delays[None, :]) | ~active[:, None]
        column = torch.where(is_init, self.initial[None, :], column)
        x = self.embed(column[:, :, None])  # [B, 1, dim]
        for b, emb in embed_rows:
            x[b, 0] = emb.to(device=dev, dtype=x.dtype)
        out = lm.transformer(x)
        if lm.out_norm is not None:
            out = lm.out_norm(out)
        text_logits = lm.text_linear(out)[:, 0]  # [B, text_card]

        # 3. Sample column o+1 where it is not forced.
        tgt_pos = ((offsets + 1) % RING)[:, None, None].expand(B, NUM_STREAMS, 1)
        target = self.cache.gather(2, tgt_pos)[..., 0]
        forced = self.provided.gather(2, tgt_pos)[..., 0]
        noise: dict[int, StepNoise] = {
            b: draw_noise(self.slots[b].rng, self.slots[b].sampling, self.text_card, self.card, dev)
            for b in rows}
        text = sample_rows(text_logits, rows, [self.slots[b].sampling.temp_text for b in rows],
                           [self.slots[b].sampling.topk_text for b in rows],
                           [None if noise[b].text is None else noise[b].text[0] for b in rows])
        text = torch.where(forced[:, 0], target[:, 0], text)
        needs_depformer = bool((~forced[:, AGENT] & active[:, None]).any())
        agent = target[:, AGENT].clone()
        if needs_depformer:
            prev = text
            with lm.depformer.streaming(B):
                for cb in range(lm.dep_q):
                    logits = lm.forward_depformer(cb, prev[:, None, None], out)[:, 0, 0]
                    tok = sample_rows(logits, rows, [self.slots[b].sampling.temp_audio for b in rows],
                                      [self.slots[b].sampling.topk_audio for b in rows],
                                      [None if noise[b].audio is None else noise[b].audio[cb] for b in rows])
                    tok = torch.where(forced[:, 1 + cb], target[:, 1 + cb], tok)
                    agent[:, cb] = tok
                    prev = tok

        # 4. Commit: fed column is consumed, column o+1 gets text + agent audio.
        act3 = active[:, None]
        self.provided.scatter_(2, fed[:, None, None].expand(B, NUM_STREAMS, 1),
                               (self.provided.gather(2, fed[:, None, None].expand(B, NUM_STREAMS, 1))[..., 0]
                                & ~act3)[..., None])
        new = target.clone()
        new[:, 0] = text
        new[:, AGENT] = agent
        new = torch.where(act3, new, target)
        self.cache.scatter_(2, tgt_pos, new[..., None])

        # 5. The frame completed by this step: text/codebook-0 in column o, delayed ones in o+1.
        frame = self.cache.gather(2, ((offsets[:, None] + self.delays[None, :]) % RING)[..., None])[..., 0]

        emitting, finished = [], []
        for b in rows:
            s = self.slots[b]
            s.offset += 1
            if s.phase is Phase.LIVE:
                emitting.append(b)
            else:
                sch = s.schedule
                assert sch is not None
                if sch.restore_cache is not None and s.offset == sch.num_embeddings:
                    self.cache[b] = sch.restore_cache.to(dev)
                    self.provided[b] = True
                if s.offset == sch.steps:
                    s.phase = Phase.LIVE
                    emitting.append(b)
                    finished.append(b)
        both = torch.stack([frame, column]).cpu()  # one device-to-host copy
        return StepOutput(tokens=both[0], fed=both[1], emitting=emitting, finished_prompt=finished)


__all__ = ["AGENT", "CALLER", "Phase", "PromptPlan", "RING", "StepOutput", "TokenGenerator"]
