"""The caller transcriber: Kyutai STT stepped once per 80 ms tick for every live call, batched.

One moshi `LMGen` in streaming mode holds every call slot's STT state, a row per slot, like the
engine's batch: a call joins (its row is reset), is stepped with the Mimi codes of each caller
frame the engine consumed, and leaves; rows that have nothing this step are masked out (moshi's
exec mask), so their state does not move and a row's text never depends on its neighbours.

Each row runs as Kyutai's streaming PyTorch example runs one stream (delayed-streams-modeling,
stt_pytorch.ipynb, and moshi's run_inference.py): greedy text, the stream's silence prefix first
(none for stt-1b-en_fr), and its first frame stepped twice, because the step that sees a stream's
first frame feeds the model its initial tokens instead.

Time. The token a row's step puts out is the model's text for audio `delay_s` older than the
frames it has seen: the token of the step that consumed the row's k-th frame (k = 0 first) is put
at `t_first + (k + 1) * FRAME_S - delay_s` (no earlier than `t_first`), one frame long, where
`t_first` is where the row's first frame lies on the call's clock (`join`). Pieces come out
`delay_s` after the words were said; the last `delay_s` before a call ends are not transcribed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agent.timebase import FRAME_S
from agent.transcribe.model import VAD_CLASS, VAD_HEAD, SttModel


@dataclass(frozen=True)
class Piece:
    """A piece of the caller's words (a sentencepiece piece, ' ' where a word starts), with the
    time of the audio it was said in, in seconds on the call's clock."""

    t0: float
    t1: float
    text: str


@dataclass(frozen=True)
class Heard:
    """One row's result of one step."""

    token: int  # the text token (padding included: what a faithfulness check compares)
    pieces: tuple[Piece, ...]  # the token as words, if it is one
    end_of_turn: float | None  # the semantic VAD's probability that the caller's turn ended


@dataclass
class _Row:
    key: str  # the call it belongs to
    t_first: float  # its first frame on the call's clock
    frames: int = 0  # frames consumed


class BatchedTranscriber:
    """Rows join and leave; `step` once per engine step, with the codes of the rows that fed
    caller audio in it. Engine thread only."""

    def __init__(self, stt: SttModel, batch_size: int):
        from moshi.models.lm import LMGen

        self.stt = stt
        self.batch_size = batch_size
        self.device = stt.device
        # greedy text, as every Kyutai STT config asks (lm_gen_config temp 0); out-of-sync
        # support makes moshi hand back every executing row's token from its first step
        self.gen = LMGen(stt.lm, use_sampling=False, temp=0.0, temp_text=0.0, support_out_of_sync=True)
        self._streaming = self.gen.streaming(batch_size)
        self._rows: dict[int, _Row] = {}
        self._unstarted: set[int] = set()  # joined, first frame not yet seen: it is stepped twice
        self._mask_rows: tuple[int, ...] | None = None

    def close(self) -> None:
        """Leave streaming mode, so the STT can serve another transcriber."""
        self._streaming.close()

    def call_in(self, slot: int) -> str | None:
        row = self._rows.get(slot)
        return row.key if row is not None else None

    def join(self, slot: int, key: str, t_first: float) -> None:
        """A call takes `slot`'s row from its next step on; its first frame lies at `t_first`
        seconds on its clock. Its silence prefix, if the model has one, runs now."""
        mask = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        mask[slot] = True
        self.gen.reset_streaming(mask)
        self._mask_rows = None  # a reset re-enables the row
        self._rows[slot] = _Row(key, t_first)
        prefix = self.stt.prefix_codes
        if len(prefix):
            for codes in [prefix[0], *prefix]:  # a stream's first frame goes in twice
                self._step_rows({slot: codes})
        else:
            self._unstarted.add(slot)

    def leave(self, slot: int) -> None:
        self._rows.pop(slot, None)
        self._unstarted.discard(slot)

    @torch.no_grad()
    def step(self, codes_by_slot: dict[int, torch.Tensor]) -> dict[int, Heard]:
        """One frame for these joined rows (each [codebooks] codes, or more: the first are read);
        the others do not move."""
        codes = {s: c for s, c in codes_by_slot.items() if s in self._rows}
        if not codes:
            return {}
        first = {s: c for s, c in codes.items() if s in self._unstarted}
        if first:
            self._step_rows(first)  # its output is the initial tokens' and is dropped
            self._unstarted -= set(first)
        tokens, heads = self._step_rows(codes)
        text = tokens[:, 0, 0].cpu().tolist()
        eot = heads[VAD_HEAD][:, 0, VAD_CLASS].float().cpu().tolist() if len(heads) > VAD_HEAD else None
        out: dict[int, Heard] = {}
        for slot in codes:
            row = self._rows[slot]
            token = int(text[slot])
            pieces: tuple[Piece, ...] = ()
            if token >= 0 and token not in self.stt.padding_ids:
                t0 = row.t_first + max(0.0, (row.frames + 1) * FRAME_S - self.stt.delay_s)
                piece = self.stt.text_tokenizer.id_to_piece(token).replace("▁", " ")
                pieces = (Piece(t0, t0 + FRAME_S, piece),)
            row.frames += 1
            out[slot] = Heard(token, pieces, None if eot is None else float(eot[slot]))
        return out

    def _step_rows(self, codes: dict[int, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One LMGen step for exactly these rows: tokens [B, 1, 1], extra heads [B, 1, dim] each."""
        rows = tuple(sorted(codes))
        if rows != self._mask_rows:
            mask = torch.zeros(self.batch_size, dtype=torch.bool)
            mask[list(rows)] = True
            self.gen.set_exec_mask(mask.to(self.device))
            self._mask_rows = rows
        n = self.stt.codebooks
        batch = torch.zeros(self.batch_size, n, 1, dtype=torch.long)
        batch[list(rows), :, 0] = torch.stack([codes[r][:n].to("cpu", torch.long) for r in rows])
        result = self.gen.step_with_extra_heads(batch.to(self.device))
        assert result is not None  # support_out_of_sync: never None
        return result
