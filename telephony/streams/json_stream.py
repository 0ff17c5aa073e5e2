"""What every JSON media-stream protocol shares, so that a carrier's module is its wire format only.

Twilio and Telnyx speak the same shape (as Pipecat's frame serializers see it): text frames with
an `event`; one `start` that names the stream; `media` frames with `track`, `chunk`,
`timestamp` and a base64 `payload`; `dtmf`, `mark` and `stop` that may repeat the stream's id.
`JsonMediaStream` holds that shape once: envelope dispatch, the stream-id check on every frame
after `start`, the media envelope (order against start/stop, track filter, strict payload
decoding) and stop. A carrier says only its field names and what differs: how its `start` reads,
how its payload decodes, its sequence number, any events of its own, and what it sends back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from telephony.streams import wire
from telephony.streams.events import Connected, Ignored, MediaIn, Started, Stopped, StreamEvent, WireError

#: `media.track` values that carry the caller (carriers name the caller's side either way)
INBOUND_TRACKS = ("inbound", "inbound_track")


class JsonMediaStream:
    """One carrier stream: `parse` what the carrier sends into `telephony.streams.events`.

    Subclasses set `name` (the carrier, in every error message), `reorders`, `id_field` (the
    stream id's top-level field) and implement `_start`, `_decode` and the `encode_*` methods."""

    name = "carrier"
    reorders = False
    id_field = "stream_id"

    def __init__(self) -> None:
        self.stream_id: str | None = None  # learnt from `start`
        self.stopped = False

    # ---- the envelope ------------------------------------------------------------------------

    def parse(self, text: str) -> StreamEvent:
        event, msg = wire.load_frame(text, self.name)
        where = f"{self.name} {event}"
        if event == "connected":
            return self._connected(msg, where)
        if event == "start":
            if self.stream_id is not None:
                raise WireError(f"{where}: a second 'start' on stream {self.stream_id}")
            return self._start(msg, where)
        if event == "media":
            return self._media(msg, where)
        if event == "dtmf":
            self._check_id(msg, where)
            return wire.dtmf_event(msg, where)
        if event == "mark":
            self._check_id(msg, where)
            return wire.mark_event(msg, where)
        if event == "stop":
            self._check_id(msg, where)
            self.stopped = True
            return Stopped()
        return self._other(event, msg, where)

    def _check_id(self, msg: dict[str, Any], where: str) -> None:
        """A frame that names a stream must name this one (frames may omit it)."""
        sid = wire.get_str(msg, self.id_field, where, required=False)
        if sid is not None and self.stream_id is not None and sid != self.stream_id:
            raise WireError(f"{where}: {self.id_field} {sid!r} is not this stream's ({self.stream_id!r})")

    def _media(self, msg: dict[str, Any], where: str) -> MediaIn | Ignored:
        if self.stream_id is None:
            raise WireError(f"{where}: media before 'start'")
        if self.stopped:
            return Ignored("media after stop")  # a carrier may still deliver frames sent before it
        self._check_id(msg, where)
        media = wire.get_obj(msg, "media", where)
        w = where + ".media"
        track = wire.get_str(media, "track", w, required=False)
        chunk = wire.get_int(media, "chunk", w, required=False)
        wire.get_int(media, "timestamp", w, required=False)
        payload = wire.decode_payload(wire.get_str(media, "payload", w, max_len=1 << 30), w)
        if track is not None and track not in INBOUND_TRACKS:
            return Ignored(f"media ({track} track)")
        return MediaIn(self._decode(payload, w), seq=self._seq(msg, chunk, where))

    # ---- what a carrier says -----------------------------------------------------------------

    def _connected(self, msg: dict[str, Any], where: str) -> Connected:
        return Connected()

    def _start(self, msg: dict[str, Any], where: str) -> Started:
        """Read `start`, set `stream_id` (and the audio format), return the event."""
        raise NotImplementedError

    def _decode(self, payload: bytes, where: str) -> np.ndarray:
        """A media payload -> float32 mono at the stream's rate."""
        raise NotImplementedError

    def _seq(self, msg: dict[str, Any], chunk: int | None, where: str) -> int | None:
        """The media frame's sequence number (`media.chunk` unless the carrier says otherwise)."""
        return chunk

    def _other(self, event: str, msg: dict[str, Any], where: str) -> StreamEvent:
        """Events of the carrier's own (ignored unless it says otherwise)."""
        return Ignored(event)
