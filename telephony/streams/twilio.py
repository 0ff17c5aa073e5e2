"""Twilio Media Streams, bidirectional (`<Connect><Stream>`): frames, TwiML and signatures.

Wire format (Twilio docs, "Media Streams - WebSocket Messages"): JSON text frames, each with an
`event`. From Twilio: `connected`, then once `start` (`start.streamSid`, `start.callSid`,
`start.accountSid`, `start.tracks`, `start.customParameters`, `start.mediaFormat` =
{"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}), then `media`
(`media.track`, `media.chunk`, `media.timestamp`, `media.payload`: base64 u-law, 160 bytes per
20 ms), `dtmf` (`dtmf.digit`), `mark` (`mark.name`: a mark we sent, echoed once the audio before
it has played, or at once when a `clear` dropped that audio) and `stop`. Counters
(`sequenceNumber`, `chunk`, `timestamp`) are JSON strings. To Twilio: `media` with
`streamSid` and `media.payload` (u-law 8 kHz, no file header), `mark`, `clear`.

Twilio delivers media over one ordered WebSocket, so `reorders` is False; `MediaIn.seq` still
carries `media.chunk` for diagnostics.

Custom parameters: `connect_stream_twiml(url, parameters)` puts them in `<Parameter>` elements
and Twilio returns them in `start.customParameters` (the `<Stream>` url itself must not carry a
query string: Twilio does not pass it on). `Started.caller` / `Started.dialled` come from the
parameters named "from" / "to", matched case-insensitively (so "From"/"To", copied from the
voice webhook's form fields, work too).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit, urlunsplit
from xml.etree import ElementTree as ET

import numpy as np

from telephony.streams import wire
from telephony.audio.codecs import mulaw_decode, mulaw_encode
from telephony.streams.events import AudioFormat, Started, WireError
from telephony.streams.json_stream import JsonMediaStream

CARRIER = "twilio"
ENCODING = "audio/x-mulaw"
SAMPLE_RATE = 8000
SIGNATURE_HEADER = "X-Twilio-Signature"


def _param(params: Mapping[str, str], name: str) -> str | None:
    for k, v in params.items():
        if k.lower() == name:
            return v
    return None


class TwilioStream(JsonMediaStream):
    """One Twilio Media Stream: Twilio's wire format on the shared JSON envelope
    (`JsonMediaStream`: dispatch, streamSid checks, media, stop).

    State is only what the protocol needs: the stream id learnt from `start` (echoed in every
    frame we send) and whether the stream has started or stopped (media before `start` is a
    protocol error; media after `stop` is ignored)."""

    name = CARRIER
    reorders = False
    id_field = "streamSid"

    def __init__(self) -> None:
        super().__init__()
        self.call_sid: str | None = None
        self.account_sid: str | None = None

    @property
    def stream_sid(self) -> str | None:
        return self.stream_id

    # ---- from Twilio -------------------------------------------------------------------------

    def _start(self, msg: dict, where: str) -> Started:
        start = wire.get_obj(msg, "start", where)
        w = where + ".start"
        sid = wire.get_str(start, "streamSid", w, required=False)
        top = wire.get_str(msg, "streamSid", where, required=False)
        if sid is None and top is None:
            raise WireError(f"{where}: missing string 'streamSid'")
        if sid is not None and top is not None and sid != top:
            raise WireError(f"{where}: start.streamSid {sid!r} differs from streamSid {top!r}")
        call_sid = wire.get_str(start, "callSid", w)
        account_sid = wire.get_str(start, "accountSid", w, required=False)
        tracks = start.get("tracks")
        if tracks is not None and not (isinstance(tracks, list) and all(isinstance(t, str) for t in tracks)):
            raise WireError(f"{w}: 'tracks' must be a list of strings")
        fmt = wire.get_obj(start, "mediaFormat", w, required=False)
        if fmt is not None:
            fw = w + ".mediaFormat"
            enc = wire.get_str(fmt, "encoding", fw, required=False)
            rate = wire.get_int(fmt, "sampleRate", fw, required=False)
            channels = wire.get_int(fmt, "channels", fw, required=False)
            if enc is not None and enc.lower() != ENCODING:
                raise WireError(f"{fw}: unsupported encoding {enc!r} (Twilio streams {ENCODING})")
            if rate is not None and rate != SAMPLE_RATE:
                raise WireError(f"{fw}: unsupported sampleRate {rate} (Twilio streams {SAMPLE_RATE})")
            if channels is not None and channels != 1:
                raise WireError(f"{fw}: unsupported channels {channels} (mono only)")
        params = wire.get_str_map(start, "customParameters", w)
        self.stream_id = sid or top
        self.call_sid, self.account_sid = call_sid, account_sid
        return Started(stream_id=self.stream_id, call_id=call_sid,
                       audio=AudioFormat("mulaw", SAMPLE_RATE, 1), parameters=params,
                       caller=_param(params, "from"), dialled=_param(params, "to"), account_id=account_sid)

    def _decode(self, payload: bytes, where: str) -> np.ndarray:
        return mulaw_decode(payload)

    # ---- to Twilio ---------------------------------------------------------------------------

    def _sid(self) -> str:
        if self.stream_sid is None:
            raise RuntimeError("twilio: nothing can be sent before the stream's 'start'")
        return self.stream_sid

    def encode_media(self, pcm: np.ndarray) -> str:
        """Agent audio (float32 mono, 8 kHz) -> one `media` frame of base64 u-law."""
        return wire.dump({"event": "media", "streamSid": self._sid(),
                          "media": {"payload": wire.encode_payload(mulaw_encode(pcm))}})

    def encode_mark(self, name: str) -> str:
        return wire.dump({"event": "mark", "streamSid": self._sid(), "mark": {"name": str(name)}})

    def encode_clear(self) -> str:
        return wire.dump({"event": "clear", "streamSid": self._sid()})


# ---- TwiML -------------------------------------------------------------------------------------

_XML_DECL = '<?xml version="1.0" encoding="UTF-8"?>'


def _xml_safe(value: str, what: str) -> str:
    """XML 1.0 cannot carry most control characters at all (escaping does not help): refuse them
    rather than emit TwiML that Twilio cannot parse."""
    for ch in value:
        o = ord(ch)
        if (o < 0x20 and ch not in "\t\n\r") or 0xD800 <= o <= 0xDFFF or o in (0xFFFE, 0xFFFF):
            raise ValueError(f"{what} contains a character XML cannot carry (U+{o:04X})")
    return value


def connect_stream_twiml(stream_url: str, parameters: Mapping[str, str] | None = None) -> str:
    """TwiML answering a call with a bidirectional Media Stream to `stream_url`, passing
    `parameters` as `<Parameter name=.. value=../>` (Twilio hands them back in
    `start.customParameters`). Values are escaped by ElementTree, never pasted into markup.

    `stream_url` must be ws:// or wss:// (Twilio itself only connects to wss) without a query
    string: Twilio does not pass query strings on, so anything the stream needs goes in
    `parameters`."""
    parts = urlsplit(stream_url)
    if parts.scheme not in ("wss", "ws") or not parts.netloc:
        raise ValueError(f"stream url must be an absolute wss:// url, not {stream_url!r}")
    if parts.query or parts.fragment:
        raise ValueError("Twilio drops a <Stream> url's query string: pass values as parameters")
    response = ET.Element("Response")
    connect = ET.SubElement(response, "Connect")
    stream = ET.SubElement(connect, "Stream", {"url": _xml_safe(stream_url, "stream url")})
    for name, value in (parameters or {}).items():
        if not isinstance(name, str) or not isinstance(value, str) or not name:
            raise ValueError(f"stream parameters must be non-empty string names with string values: {name!r}")
        ET.SubElement(stream, "Parameter", {"name": _xml_safe(name, "parameter name"),
                                            "value": _xml_safe(value, f"parameter {name!r}")})
    return _XML_DECL + ET.tostring(response, encoding="unicode")


def reject_twiml(reason: str = "busy") -> str:
    """TwiML refusing the call without answering it (no charge): reason "busy" or "rejected"."""
    if reason not in ("busy", "rejected"):
        raise ValueError(f"Twilio <Reject> reason must be 'busy' or 'rejected', not {reason!r}")
    response = ET.Element("Response")
    ET.SubElement(response, "Reject", {"reason": reason})
    return _XML_DECL + ET.tostring(response, encoding="unicode")


# ---- per-call stream grants ---------------------------------------------------------------------
#
# Twilio signs the stream's WebSocket request over its URL only, and that URL is the same for
# every call: one captured X-Twilio-Signature would open any number of streams. So the voice
# webhook (whose signature covers the call's own form fields) adds one more <Parameter> to its
# TwiML: a grant binding the CallSid, the other parameters and an expiry, keyed by the auth
# token. Twilio hands it back in `start.customParameters`; a stream whose grant is missing,
# forged, expired, for another call or already used is refused.

GRANT_PARAMETER = "personaplex_grant"


def _grant_mac(auth_token: str, call_sid: str, parameters: Mapping[str, str], expires: int) -> str:
    signed = json.dumps([call_sid, expires, sorted((k, v) for k, v in parameters.items() if k != GRANT_PARAMETER)],
                        separators=(",", ":"), ensure_ascii=False)
    return hmac.new(auth_token.encode("utf-8"), signed.encode("utf-8"), hashlib.sha256).hexdigest()


def stream_grant(auth_token: str, call_sid: str, parameters: Mapping[str, str], expires: int) -> str:
    """The grant parameter's value for this call's stream: "<expiry>.<hex HMAC-SHA256>"."""
    return f"{int(expires)}.{_grant_mac(auth_token, call_sid, parameters, int(expires))}"


def grant_problem(auth_token: str, call_sid: str, parameters: Mapping[str, str], now: float) -> str | None:
    """Why this stream's grant (in `parameters`) does not admit it, or None (constant-time)."""
    grant = parameters.get(GRANT_PARAMETER)
    if not grant:
        return "the stream carries no grant from our voice webhook"
    expires_text, _, mac = grant.partition(".")
    if not expires_text.isdigit() or not mac:
        return "the stream's grant is malformed"
    expected = _grant_mac(auth_token, call_sid, parameters, int(expires_text))
    if not hmac.compare_digest(expected.encode(), mac.encode("ascii", "replace")):
        return "the stream's grant is not valid for this call"
    if int(expires_text) < now:
        return "the stream's grant has expired"
    return None


# ---- request signatures -----------------------------------------------------------------------

ParamValues = str | Iterable[str]


def _signed_string(url: str, params: Mapping[str, ParamValues] | None) -> str:
    """The full URL, then each POST parameter's name and value with no separators, names in
    case-sensitive (code point) order; a name sent several times contributes each of its values,
    in sorted order (what Twilio's helper libraries do for repeated form fields)."""
    parts = [url]
    for name in sorted(params or {}):
        value = (params or {})[name]
        values = [value] if isinstance(value, str) else sorted(value)
        parts.extend(name + v for v in values)
    return "".join(parts)


def twilio_signature(auth_token: str, url: str, params: Mapping[str, ParamValues] | None = None) -> str:
    """The `X-Twilio-Signature` Twilio sends with a webhook: base64(HMAC-SHA1(auth token,
    URL + sorted POST parameters)). `url` is the exact URL Twilio requested, query included."""
    mac = hmac.new(auth_token.encode("utf-8"), _signed_string(url, params).encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def _port_variants(url: str) -> list[str]:
    """The URL as given, without its port and with the scheme's default port: Twilio's helper
    libraries accept a signature over any of these, because what Twilio signs depends on how
    the webhook URL was configured (proxies and load balancers add or drop the port)."""
    parts = urlsplit(url)
    out = [url]
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = userinfo + "@" if userinfo else ""
    try:
        port = parts.port
    except ValueError:
        return out
    default = {"https": 443, "http": 80, "wss": 443, "ws": 80}.get(parts.scheme)
    if port is not None:
        out.append(urlunsplit(parts._replace(netloc=prefix + host)))
    elif default is not None:
        out.append(urlunsplit(parts._replace(netloc=f"{prefix}{host}:{default}")))
    return out


def valid_signature(auth_token: str, url: str, params: Mapping[str, ParamValues] | None,
                    signature: str | None) -> bool:
    """Whether `signature` (the X-Twilio-Signature header) is Twilio's for this request.
    Constant-time comparison; a missing or empty signature is never valid."""
    if not signature or not auth_token:
        return False
    given = signature.strip().encode("ascii", "replace")
    ok = False
    for candidate in _port_variants(url):
        ok |= hmac.compare_digest(twilio_signature(auth_token, candidate, params).encode("ascii"), given)
    return ok
