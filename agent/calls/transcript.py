"""What was said on a call, both sides, on the call's own clock.

The agent's side comes from PersonaPlex's text stream (one sentencepiece piece per 80 ms frame
at most, padding left out), the caller's from the caller transcriber. Both arrive as pieces
with the time of the audio they belong to, in seconds from the call's answer (its first agent
frame): t0 at the piece's first frame, t1 at the end of its last.

`Transcript` keeps two views: every piece as it came (what a live viewer is sent, `TranscriptPiece`
events on the session) and segments, consecutive pieces of one speaker joined into text until
that speaker pauses (what a call record and the call-end webhook carry). Transcripts are
personal data: they go to records, webhooks and the ops event stream, never to logs.

A call's transcript is closed when the call ends (`CallSession.set_state(ENDED)`, before the
`Ended` event): the record and the webhook, both written from that event, then carry the same
segments, and a piece that arrives later (a transcriber still finishing) is counted in `late`,
not kept. A transcriber that wants its last words kept delivers them before the call ends.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

Who = Literal["agent", "caller"]

#: a speaker's pause longer than this starts a new segment
SEGMENT_GAP_S = 0.8


@dataclass(frozen=True)
class TranscriptPiece:
    """A piece of one side's words: `text` keeps its leading space where a word starts."""

    who: Who
    t0: float
    t1: float
    text: str
    n: int = 0  # its number in the call's transcript (1, 2, ...; both sides), set when kept

    def as_dict(self) -> dict:
        return {"who": self.who, "t0": round(self.t0, 2), "t1": round(self.t1, 2), "text": self.text, "n": self.n}


@dataclass
class Segment:
    who: Who
    t0: float
    t1: float
    text: str

    def as_dict(self) -> dict:
        return {"who": self.who, "t0": round(self.t0, 2), "t1": round(self.t1, 2), "text": self.text.strip()}


class Transcript:
    """Both sides of one call. Written by the engine thread (agent) and the transcriber (caller);
    read by any thread (a snapshot under the lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: list[Segment] = []
        self._open: dict[str, Segment] = {}  # per speaker: the segment its next piece may extend
        self.pieces = 0
        self.closed = False
        self.late = 0  # pieces that came after `close`

    def add(self, piece: TranscriptPiece) -> int:
        """Keep a piece: its number (1, 2, ...), or 0 when it is not kept (empty, or the
        transcript is closed). Numbers, not times, tell a live reader which pieces a snapshot
        already holds: the caller's pieces of the recogniser's first `delay_s` all carry the
        call's first instant."""
        if not piece.text:
            return 0
        with self._lock:
            if self.closed:
                self.late += 1
                return 0
            self.pieces += 1
            seg = self._open.get(piece.who)
            if seg is not None and piece.t0 - seg.t1 <= SEGMENT_GAP_S and self._segments[-1] is seg:
                seg.text += piece.text
                seg.t1 = max(seg.t1, piece.t1)
                return self.pieces
            seg = Segment(piece.who, piece.t0, piece.t1, piece.text)
            self._segments.append(seg)
            self._open[piece.who] = seg
            return self.pieces

    def close(self) -> None:
        """No more pieces: what the call's record and webhook carry is final."""
        with self._lock:
            self.closed = True

    def segments(self) -> list[dict]:
        """Segments in the order they started (JSON-ready)."""
        with self._lock:
            return [s.as_dict() for s in sorted(self._segments, key=lambda s: s.t0)]

    def last(self, n: int) -> list[dict]:
        """The last `n` segments (a call list's preview)."""
        return self.segments()[-n:] if n > 0 else []

    def snapshot(self, n: int) -> tuple[list[dict], int]:
        """The last `n` segments and how many pieces they were made of so far, read together (a
        live reader skips the pieces numbered up to that)."""
        with self._lock:
            segments = [s.as_dict() for s in sorted(self._segments, key=lambda s: s.t0)]
            return (segments[-n:] if n > 0 else []), self.pieces


__all__ = ["SEGMENT_GAP_S", "Segment", "Transcript", "TranscriptPiece", "Who"]
