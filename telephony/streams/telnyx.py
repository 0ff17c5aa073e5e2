"""Telnyx media streaming over WebSocket, bidirectional RTP mode: frames in, frames out.

Wire format (Telnyx docs, "Media Streaming over Websockets" and the AsyncAPI page "Stream call
media over WebSocket"): JSON text frames with an `event`. From Telnyx: `connected` (optionally
carrying `x-telnyx-streaming-auth-token`), then `start` with top-level `stream_id` and
`sequence_number`, and `start` = {`user_id`, `call_control_id`, `call_session_id`, `from`, `to`,
`tags`, `client_state`, `custom_parameters`, `media_format` = {`encoding`, `sample_rate`,
`channels`}}; then `media` (`media.track`, `media.chunk`, `media.timestamp`, `media.payload`:
base64 RTP payload without RTP headers), `dtmf` (`dtmf.digit`, plus `occurred_at`), `mark`
(`mark.name`: ours, returned when the audio before it finished playing, at once when nothing
is queued, and for every queued mark on `clear`), `error` (`payload` = {`code`, `title`,
`detail`}) and `stop`. Counters are JSON strings.

"Media frame order is not guaranteed": `reorders` is True and `MediaIn.seq` is `media.chunk`,
the per-media-frame counter the docs name for reordering (`sequence_number` counts every frame,
marks and DTMF included, so it has holes between media frames that would look like losses).
The transport runs a `telephony.streams.reorder.Reorderer` on it.

To Telnyx (bidirectional `rtp` mode): `{"event": "media", "media": {"payload": ...}}` (20 ms to
30 s of audio per frame), `{"event": "mark", "mark": {"name": ...}}` and `{"event": "clear"}`.
The documented outbound frames carry no `stream_id` (the socket identifies the stream), so
none is sent.

Encodings: PCMU (8 kHz) and L16 are supported; PCMA, G722, OPUS and AMR-WB are refused with a
`WireError` naming the encoding. L16 is big-endian (network byte order): Telnyx carries RTP
payloads and RFC 3551 defines L16 in network byte order; Telnyx's pages do not state the order
explicitly, so it is a constructor argument. Outbound audio uses the inbound `media_format`
(configure `stream_bidirectional_codec` / sampling rate to match `stream_codec`), unless
`outbound` says otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from telephony.streams import wire
from telephony.audio.codecs import ByteOrder, l16_decode, l16_encode, mulaw_decode, mulaw_encode
from telephony.streams.events import AudioFormat, Connected, Ignored, Started, StreamEvent, WireError
from telephony.streams.json_stream import JsonMediaStream

CARRIER = "telnyx"
#: the `stream_auth_token` set in call control comes back as this WebSocket header and as this
#: field of the `connected` frame
AUTH_TOKEN_FIELD = "x-telnyx-streaming-auth-token"

#: Telnyx `media_format.encoding` values we speak -> our AudioFormat.encoding. Older Telnyx pages
#: show "audio/x-mulaw" for PCMU streams, current ones "PCMU".
_ENCODINGS = {"pcmu": "mulaw", "audio/x-mulaw": "mulaw", "l16": "l16", "audio/l16": "l16"}
#: Rates Telnyx documents for streaming; PCMU is 8 kHz only.
_L16_RATES = (8000, 16000, 22050, 24000, 48000)


def parse_media_format(fmt: dict[str, Any], where: str) -> AudioFormat:
    """`media_format` -> AudioFormat, refusing what we cannot decode with the encoding's name."""
    enc = wire.get_str(fmt, "encoding", where)
    rate = wire.get_int(fmt, "sample_rate", where, required=False)
    channels = wire.get_int(fmt, "channels", where, required=False)
    ours = _ENCODINGS.get(enc.lower())
    if ours is None:
        raise WireError(f"{where}: unsupported encoding {enc!r} (we support PCMU and L16; configure "
                        f"stream_codec and stream_bidirectional_codec to one of them)")
    if ours == "mulaw":
        rate = 8000 if rate is None else rate
        if rate != 8000:
            raise WireError(f"{where}: PCMU at sample_rate {rate} (PCMU is 8000 Hz)")
    else:
        rate = 16000 if rate is None else rate
        if rate not in _L16_RATES:
            raise WireError(f"{where}: unsupported L16 sample_rate {rate} (one of {_L16_RATES})")
    if channels not in (None, 1):
        raise WireError(f"{where}: unsupported channels {channels} (mono only)")
    return AudioFormat(ours, rate, 1)


def _custom_parameters(start: dict[str, Any], where: str) -> dict[str, str]:
    """`custom_parameters` as an object of strings; the list-of-{name, value} form used by the
    streaming_start command is accepted too."""
    raw = start.get("custom_parameters")
    if isinstance(raw, list):
        out: dict[str, str] = {}
        for i, item in enumerate(raw):
            w = f"{where}.custom_parameters[{i}]"
            if not isinstance(item, dict):
                raise WireError(f"{w}: must be an object with 'name' and 'value'")
            out[wire.get_str(item, "name", w)] = wire.get_str(item, "value", w)
        return out
    return wire.get_str_map(start, "custom_parameters", where)


class TelnyxStream(JsonMediaStream):
    """One Telnyx media stream: Telnyx's wire format on the shared JSON envelope
    (`JsonMediaStream`: dispatch, stream_id checks, media, stop).

    `l16_byteorder`: byte order of L16 payloads both ways (big-endian, see the module doc).
    `outbound`: the bidirectional codec when it differs from the inbound `media_format`."""

    name = CARRIER
    reorders = True
    id_field = "stream_id"

    def __init__(self, *, l16_byteorder: ByteOrder = "big", outbound: AudioFormat | None = None) -> None:
        if l16_byteorder not in ("big", "little"):
            raise ValueError(f"l16_byteorder must be 'big' or 'little', not {l16_byteorder!r}")
        if outbound is not None and (outbound.encoding not in ("mulaw", "l16") or outbound.channels != 1):
            raise ValueError(f"unsupported outbound format {outbound}")
        super().__init__()
        self.l16_byteorder: ByteOrder = l16_byteorder
        self.call_control_id: str | None = None
        self.inbound: AudioFormat | None = None
        self.outbound: AudioFormat | None = outbound
        self.errors: list[str] = []  # every `error` frame, as "code title: detail"

    # ---- from Telnyx -------------------------------------------------------------------------

    def _connected(self, msg: dict[str, Any], where: str) -> Connected:
        return Connected(wire.get_str(msg, AUTH_TOKEN_FIELD, where, required=False))

    def _other(self, event: str, msg: dict[str, Any], where: str) -> StreamEvent:
        return Ignored(self._error(msg, where)) if event == "error" else Ignored(event)

    def _start(self, msg: dict[str, Any], where: str) -> Started:
        start = wire.get_obj(msg, "start", where)
        w = where + ".start"
        stream_id = wire.get_str(msg, "stream_id", where)
        call_control_id = wire.get_str(start, "call_control_id", w)
        caller = wire.get_str(start, "from", w, required=False)
        dialled = wire.get_str(start, "to", w, required=False)
        audio = parse_media_format(wire.get_obj(start, "media_format", w), w + ".media_format")
        params = _custom_parameters(start, w)
        self.stream_id, self.call_control_id, self.inbound = stream_id, call_control_id, audio
        if self.outbound is None:
            self.outbound = audio
        return Started(stream_id=stream_id, call_id=call_control_id, audio=audio, parameters=params,
                       caller=caller, dialled=dialled)

    def _seq(self, msg: dict[str, Any], chunk: int | None, where: str) -> int | None:
        # `media.chunk` counts media frames; `sequence_number` (every frame) only as a fallback
        return chunk if chunk is not None else wire.get_int(msg, "sequence_number", where, required=False)

    def _decode(self, payload: bytes, where: str) -> np.ndarray:
        assert self.inbound is not None  # set with the stream id by `start`
        if self.inbound.encoding == "mulaw":
            return mulaw_decode(payload)
        try:
            return l16_decode(payload, byteorder=self.l16_byteorder)
        except ValueError as e:
            raise WireError(f"{where}: {e}") from None

    def _error(self, msg: dict[str, Any], where: str) -> str:
        """An `error` frame as one log-friendly line: "error 100003 malformed_frame: detail"."""
        payload = msg.get("payload")
        if not isinstance(payload, dict):
            text = "error (no payload)"
        else:
            code, title, detail = payload.get("code"), payload.get("title"), payload.get("detail")
            text = "error " + " ".join(str(x)[:200] for x in (code, title) if x is not None)
            if detail is not None:
                text += f": {str(detail)[:500]}"
        self.errors.append(text)
        del self.errors[:-20]  # keep the latest few: a looping error must not grow memory
        return text

    # ---- to Telnyx ---------------------------------------------------------------------------

    def _out(self) -> AudioFormat:
        if self.outbound is None:
            raise RuntimeError("telnyx: no outbound format before the stream's 'start'")
        return self.outbound

    def encode_media(self, pcm: np.ndarray) -> str:
        """Agent audio (float32 mono at the outbound rate) -> one `media` frame. Telnyx takes
        20 ms to 30 s of audio per frame: send at least 20 ms at a time."""
        fmt = self._out()
        data = mulaw_encode(pcm) if fmt.encoding == "mulaw" else l16_encode(pcm, byteorder=self.l16_byteorder)
        return wire.dump({"event": "media", "media": {"payload": wire.encode_payload(data)}})

    def encode_mark(self, name: str) -> str:
        return wire.dump({"event": "mark", "mark": {"name": str(name)}})

    def encode_clear(self) -> str:
        return wire.dump({"event": "clear"})
