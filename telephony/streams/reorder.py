"""Putting media frames back in order when a carrier does not guarantee it (Telnyx).

A `Reorderer` sits between `MediaStreamProtocol.parse` and the audio path of one stream when
the protocol says `reorders`. It releases `MediaIn` frames in sequence order as soon as they can
be: the expected frame goes straight through (no added latency when nothing is out of order);
a frame from the future waits until the gap before it fills, or until more than `window` frames
are waiting, at which point the gap is given up as lost and playing resumes from the earliest
waiting frame. Frames older than what was already released, and duplicates, are dropped.

So a frame overtaken by up to `window` later frames is still used; a frame that never arrives
delays the frames after it by `window` frames (3 x 20 ms by default) once, then the stream is
back in step. Memory is
bounded by `window`. Frames without a sequence number pass straight through.

It never waits on a clock: a stream that stops sending leaves its last out-of-order frames
waiting, so the transport calls `flush()` when the stream stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from telephony.streams.events import MediaIn


@dataclass
class ReorderStats:
    released: int = 0
    reordered: int = 0  # frames that arrived ahead of a gap and were held, then released in order
    dropped_late: int = 0  # arrived after their place was played or given up (re-sends included)
    dropped_duplicate: int = 0  # a second copy of a frame still waiting
    gaps_skipped: int = 0  # sequence numbers given up as lost
    unnumbered: int = 0  # frames without seq (passed through)


@dataclass
class Reorderer:
    """In-order release of one stream's `MediaIn` frames by `seq`.

    `first`: the sequence number the stream starts at, when the carrier defines it (Twilio
    documents `media.chunk` starting at 1; Telnyx's examples agree). With it, a first frame that
    overtook its predecessors waits for them like any other (a stream that starts higher costs
    one window once; one that starts lower simply moves the start down); with None, the first
    frame seen sets the baseline."""

    window: int = 3
    first: int | None = 1
    stats: ReorderStats = field(default_factory=ReorderStats)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("reorder window must be at least 1 frame")
        self._next: int | None = self.first
        self._held: dict[int, MediaIn] = {}

    @property
    def expected(self) -> int | None:
        """The sequence number released next (None until the first frame when `first` is None)."""
        return self._next

    @property
    def waiting(self) -> int:
        """Frames held back behind a gap."""
        return len(self._held)

    def push(self, frame: MediaIn) -> list[MediaIn]:
        """Take one frame; return the frames now releasable, in order (often just this one)."""
        seq = frame.seq
        if seq is None:
            self.stats.unnumbered += 1
            self.stats.released += 1
            return [frame]
        if self._next is None or (seq < self._next and self.stats.released == self.stats.unnumbered):
            self._next = seq  # nothing numbered released yet: the stream starts lower than assumed
        if seq < self._next:
            self.stats.dropped_late += 1
            return []
        if seq in self._held:
            self.stats.dropped_duplicate += 1
            return []
        if seq != self._next:
            self.stats.reordered += 1
        self._held[seq] = frame
        out = self._drain()
        if len(self._held) > self.window:  # the gap is not filling: give it up
            first_held = min(self._held)
            self.stats.gaps_skipped += first_held - self._next
            self._next = first_held
            out += self._drain()
        return out

    def flush(self) -> list[MediaIn]:
        """Release everything still held, in order, skipping the gaps (at the end of a stream)."""
        out: list[MediaIn] = []
        for seq in sorted(self._held):
            if self._next is not None and seq > self._next:
                self.stats.gaps_skipped += seq - self._next
            out.append(self._held.pop(seq))
            self._next = seq + 1
        self.stats.released += len(out)
        return out

    def _drain(self) -> list[MediaIn]:
        out: list[MediaIn] = []
        while self._next in self._held:
            out.append(self._held.pop(self._next))
            self._next += 1
        self.stats.released += len(out)
        return out
