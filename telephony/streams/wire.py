"""JSON text frames of carrier media streams: bounded parsing and typed field access.

Shared by the carrier modules (`telephony.streams.twilio`, `telephony.streams.telnyx`) so that every frame,
whoever sent it, is checked the same way before anything uses it: size first (a huge frame is
refused before it is parsed), then JSON, then each field's type. Every failure is a
`WireError` whose message names the carrier, the event and the field, because the transport
logs exactly that message for the operator.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from telephony.streams.events import DtmfIn, MarkIn, WireError

#: Largest text frame accepted (characters). A 20 ms media frame is about 300; this leaves room
#: for big `start` frames (custom parameters) while refusing megabyte frames before parsing.
MAX_FRAME_CHARS = 256 * 1024
#: Largest decoded media payload (bytes): 64 KiB is 8 s of u-law or 2 s of 16 kHz L16.
MAX_PAYLOAD_BYTES = 64 * 1024
#: Largest mark name / parameter value we accept (characters).
MAX_TEXT_FIELD = 4096


def load_frame(text: str | bytes, carrier: str) -> tuple[str, dict[str, Any]]:
    """Parse one frame: (event name, the whole object). Refuses oversized or binary-garbage
    frames, non-JSON, JSON that is not an object, and objects without a string `event`."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        if len(text) > MAX_FRAME_CHARS:
            raise WireError(f"{carrier}: frame of {len(text)} bytes is over the {MAX_FRAME_CHARS} limit")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise WireError(f"{carrier}: binary frame is not UTF-8 text ({e.reason})") from None
    if not isinstance(text, str):
        raise WireError(f"{carrier}: frame must be text, not {type(text).__name__}")
    if len(text) > MAX_FRAME_CHARS:
        raise WireError(f"{carrier}: frame of {len(text)} characters is over the {MAX_FRAME_CHARS} limit")
    try:
        obj = orjson.loads(text)  # a frame every 20 ms per call: orjson, not json (about 5x)
    except orjson.JSONDecodeError as e:  # also nesting over 1024 levels
        raise WireError(f"{carrier}: frame is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise WireError(f"{carrier}: frame must be a JSON object, not {type(obj).__name__}")
    event = obj.get("event")
    if not isinstance(event, str) or not event:
        raise WireError(f"{carrier}: frame has no string 'event' field")
    return event, obj


def _where(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def get_obj(d: dict[str, Any], key: str, where: str, *, required: bool = True) -> dict[str, Any] | None:
    """`d[key]` as a JSON object; None when absent and not required."""
    v = d.get(key)
    if v is None:
        if required:
            raise WireError(f"{where}: missing object '{key}'")
        return None
    if not isinstance(v, dict):
        raise WireError(f"{where}: '{key}' must be an object, not {type(v).__name__}")
    return v


def get_str(d: dict[str, Any], key: str, where: str, *, required: bool = True,
            max_len: int = MAX_TEXT_FIELD) -> str | None:
    """`d[key]` as a string of at most `max_len` characters; None when absent and not required."""
    v = d.get(key)
    if v is None:
        if required:
            raise WireError(f"{where}: missing string '{key}'")
        return None
    if not isinstance(v, str):
        raise WireError(f"{where}: '{key}' must be a string, not {type(v).__name__}")
    if len(v) > max_len:
        raise WireError(f"{where}: '{key}' is {len(v)} characters, over the {max_len} limit")
    return v


def get_int(d: dict[str, Any], key: str, where: str, *, required: bool = True) -> int | None:
    """`d[key]` as a non-negative integer. Carriers send counters as JSON strings ("sequenceNumber":
    "4") and formats as numbers ("sampleRate": 8000): both are accepted, nothing else."""
    v = d.get(key)
    if v is None:
        if required:
            raise WireError(f"{where}: missing integer '{key}'")
        return None
    if isinstance(v, bool):
        raise WireError(f"{where}: '{key}' must be an integer, not a boolean")
    if isinstance(v, int):
        n = v
    elif isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 18:
        n = int(v)
    else:
        raise WireError(f"{where}: '{key}' must be a non-negative integer, got {str(v)[:40]!r}")
    if n < 0:
        raise WireError(f"{where}: '{key}' must be non-negative, got {n}")
    return n


def get_str_map(d: dict[str, Any], key: str, where: str) -> dict[str, str]:
    """`d[key]` as a {string: string} object (custom parameters); {} when absent."""
    v = get_obj(d, key, where, required=False)
    if v is None:
        return {}
    out: dict[str, str] = {}
    for k, val in v.items():
        if not isinstance(val, str):
            raise WireError(f"{where}: parameter {k[:40]!r} in '{key}' must be a string, "
                            f"not {type(val).__name__}")
        if len(k) > MAX_TEXT_FIELD or len(val) > MAX_TEXT_FIELD:
            raise WireError(f"{where}: parameter {k[:40]!r} in '{key}' is over {MAX_TEXT_FIELD} characters")
        out[k] = val
    return out


def decode_payload(b64: str, where: str, *, limit: int = MAX_PAYLOAD_BYTES) -> bytes:
    """Strict base64 (standard alphabet, correct padding) to bytes, refusing anything that would
    decode to more than `limit` bytes before decoding it."""
    if len(b64) > 4 * ((limit + 2) // 3):
        raise WireError(f"{where}: payload of {len(b64)} base64 characters decodes to more than "
                        f"{limit} bytes")
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise WireError(f"{where}: payload is not valid base64 ({e})") from None


def encode_payload(data: bytes) -> str:
    """Bytes -> standard base64 text (what both carriers expect in `media.payload`)."""
    return base64.b64encode(data).decode("ascii")


def dump(obj: dict[str, Any]) -> str:
    """One compact JSON text frame (UTF-8, not ASCII-escaped)."""
    return orjson.dumps(obj).decode()


DTMF_DIGITS = frozenset("0123456789*#ABCD")


def dtmf_digit(value: str, where: str) -> str:
    """A single DTMF key: 0-9, *, #, A-D (lower case a-d accepted and upper-cased)."""
    digit = value.upper()
    if len(digit) != 1 or digit not in DTMF_DIGITS:
        raise WireError(f"{where}: {value[:10]!r} is not a DTMF digit (0-9, *, #, A-D)")
    return digit


def dtmf_event(msg: dict[str, Any], where: str) -> DtmfIn:
    """A `dtmf` frame's key (both carriers send `{"dtmf": {"digit": "5"}}`)."""
    dtmf = get_obj(msg, "dtmf", where)
    return DtmfIn(dtmf_digit(get_str(dtmf, "digit", where + ".dtmf"), where))


def mark_event(msg: dict[str, Any], where: str) -> MarkIn:
    """A `mark` frame's name: the carrier has played our audio up to the mark we sent."""
    mark = get_obj(msg, "mark", where)
    return MarkIn(get_str(mark, "name", where + ".mark"))
