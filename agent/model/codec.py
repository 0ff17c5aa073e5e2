"""Mimi as a batch of per-call streaming codecs.

One `MimiModel` in streaming mode holds the encoder and decoder state of every call slot; a
slot is reset when a call starts, and rows that have nothing to do this frame are masked out
(moshi's exec mask) so their state does not move.

The encoder may produce more codebooks than PersonaPlex reads (`encode_codebooks`): Mimi's
quantizer is residual, each codebook quantizing what the ones before it left, so the first 8 of
a 32-codebook encode are the 8-codebook encode's codes, and a second model reading all 32 (the
caller transcriber, `agent.transcribe`) costs the extra quantizer levels, not a second encode.
"""

from __future__ import annotations

import torch


class BatchedCodec:
    def __init__(self, mimi: torch.nn.Module, batch_size: int, encode_codebooks: int):
        self.mimi = mimi
        self.batch_size = batch_size
        self.encode_codebooks = int(encode_codebooks)
        if not 0 < self.encode_codebooks <= mimi.total_codebooks:
            raise ValueError(f"Mimi has {mimi.total_codebooks} codebooks, {self.encode_codebooks} were asked for")
        self.device = next(mimi.parameters()).device
        self.frame_size = int(mimi.sample_rate / mimi.frame_rate)
        self.sample_rate = int(mimi.sample_rate)
        self._mask: torch.Tensor | None = None
        self._streaming = mimi.streaming(batch_size)

    def close(self) -> None:
        self._streaming.close()

    def _set_mask(self, mask: torch.Tensor) -> None:
        if self._mask is None or not torch.equal(self._mask, mask):
            self.mimi.set_exec_mask(mask.to(self.device))
            self._mask = mask.clone()

    def reset(self, rows: list[int]) -> None:
        if not rows:
            return
        mask = torch.zeros(self.batch_size, dtype=torch.bool)
        mask[rows] = True
        self.mimi.reset_streaming(mask.to(self.device))
        self._mask = None  # reset re-enables execution for those rows

    @torch.no_grad()
    def encode(self, pcm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pcm [B, frame] float32 (rows outside `mask` ignored) -> codes [B, encode_codebooks] (int64,
        cpu)."""
        self._set_mask(mask)
        # set per call: the Mimi module may be shared with other codecs (tests build several
        # engines on one loaded model); decoding reads the codes' own count
        self.mimi.set_num_codebooks(self.encode_codebooks)
        codes = self.mimi.encode(pcm.to(self.device, torch.float32).view(self.batch_size, 1, -1))
        return codes[:, :, 0].cpu()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """codes [B, 8] (rows outside `mask` ignored; any valid id) -> pcm [B, frame] float32 cpu."""
        self._set_mask(mask)
        pcm = self.mimi.decode(codes.to(self.device).view(self.batch_size, -1, 1))
        return pcm[:, 0].float().cpu()
