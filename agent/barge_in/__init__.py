"""Barge-in: the per-call detector (typed verdicts) and the batched VAD worker."""
