"""Test callers that behave like the cloud carriers' media streams (Twilio, Telnyx).

Each caller is an aiohttp WebSocket client written from the carrier's public documentation:
it connects to the agent's stream URL, sends `connected` then `start`, streams the caller's
audio as 20 ms `media` frames at real-time pace, and plays the agent's side the way the
carrier does: agent `media` is queued and "played" in real time, each agent `mark` is sent back
once the audio queued before it has played (at once when nothing is queued), and `clear` drops
what is queued and sends every pending mark back at once. At the end it sends `stop` and closes;
if the agent closes first (hang-up, refusal) it stops and records the close.

What the agent sent is recorded with arrival times (seconds since the socket opened):
`agent_pcm` (decoded float32 at the stream rate), `agent_media`, `marks_received`,
`marks_sent_back`, `clears`, `dropped_seconds` (queued audio a `clear` dropped), and
`protocol_errors` (agent frames the real carrier would reject: unknown events, a wrong stream
id, bad base64, ...). An end-to-end test usually asserts `protocol_errors == []`.

Also `twilio_webhook_post`: the voice webhook request Twilio makes when a call arrives (a signed
form POST), for testing the TwiML endpoint.

Example::

    caller = TwilioCaller(ws_url, parameters={"to": "+14155550100"}, wav_or_pcm="hello.wav")
    await caller.run(5.0, dtmf=[(2.0, "5")])
    assert caller.protocol_errors == [] and len(caller.agent_pcm) > 0
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
import re
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from html import unescape
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from telephony.audio.codecs import mulaw_decode, mulaw_encode
from telephony.streams.twilio import GRANT_PARAMETER, SIGNATURE_HEADER, stream_grant, twilio_signature

FRAME_S = 0.020  # both carriers send 20 ms media frames

AudioSource = str | Path | np.ndarray | None


def load_caller_audio(source: AudioSource, rate: int) -> np.ndarray:
    """The caller's audio as float32 mono at `rate`: a wav/audio file (any rate, resampled) or an
    array already at `rate`; None is silence."""
    if source is None:
        return np.zeros(0, np.float32)
    if isinstance(source, np.ndarray):
        return np.ascontiguousarray(source, dtype=np.float32).reshape(-1)
    from agent.audio_io import read_audio

    return read_audio(source, rate).astype(np.float32)


@dataclass(frozen=True)
class AgentMedia:
    at: float  # seconds since the socket opened
    samples: int
    plays_at: float  # when this audio starts playing in the carrier's real-time playout model


class _Playout:
    """The carrier's outbound buffer: agent audio plays in real time, in the order received."""

    def __init__(self) -> None:
        self.ends_at = 0.0  # time (monotonic) when everything queued so far has played
        self.pending: list[tuple[float, str]] = []  # (due time, mark name), due times ascending

    def queue(self, now: float, seconds: float) -> float:
        starts = max(now, self.ends_at)
        self.ends_at = starts + seconds
        return starts

    def mark(self, now: float, name: str) -> bool:
        """Queue a mark; True when it is due at once (nothing left to play before it)."""
        if self.ends_at <= now and not self.pending:
            return True
        self.pending.append((max(self.ends_at, now), name))
        return False

    def clear(self, now: float) -> tuple[float, list[str]]:
        """Drop what is queued: (seconds dropped, marks to send back now)."""
        dropped = max(0.0, self.ends_at - now)
        self.ends_at = now
        names = [n for _, n in self.pending]
        self.pending.clear()
        return dropped, names

    def due(self, now: float) -> list[str]:
        out = []
        while self.pending and self.pending[0][0] <= now:
            out.append(self.pending.pop(0)[1])
        return out


class CarrierCaller:
    """What both carriers' callers share: connection, pacing, playout model and records.
    Subclasses say how frames look (`_connected`, `_start`, `_media`, ...) and how agent audio
    decodes."""

    carrier = "carrier"
    seq_field = "sequence"

    def __init__(self, ws_url: str, *, rate: int, wav_or_pcm: AudioSource = None,
                 headers: dict[str, str] | None = None, connect_timeout: float = 10.0) -> None:
        self.ws_url = ws_url
        self.rate = rate
        self.frame_samples = int(rate * FRAME_S)
        self.caller_pcm = load_caller_audio(wav_or_pcm, rate)
        self.headers = dict(headers or {})
        self.connect_timeout = connect_timeout
        # records
        self.agent_media: list[AgentMedia] = []
        self.marks_received: list[tuple[float, str]] = []
        self.marks_sent_back: list[tuple[float, str]] = []
        self.clears: list[float] = []
        self.dtmf_sent: list[tuple[float, str]] = []
        self.dropped_seconds = 0.0
        self.protocol_errors: list[str] = []
        self.frames_sent = 0  # media frames
        self.close_code: int | None = None
        self.closed_by_server = False
        self.started = asyncio.Event()  # set once `start` went out
        # seconds after which no more media frames go out while the socket stays open (a
        # carrier whose media stopped without `stop`); None: media for the whole call
        self.mute_after: float | None = None
        self.burst = 1  # frames that go out together, every `burst` frame times (2: pairs every 40 ms)
        self.skip: set[int] = set()  # media chunk numbers never sent (lost on the way)
        self.muted_at: float | None = None  # monotonic time the last media frame went out
        # internals
        self._chunks: list[np.ndarray] = []
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._t0 = 0.0
        self._seq = 0
        self._send_lock = asyncio.Lock()
        self._playout = _Playout()
        self._wake = asyncio.Event()
        self._closing = False

    # ---- records -----------------------------------------------------------------------------

    @property
    def agent_pcm(self) -> np.ndarray:
        """Everything the agent sent, decoded, float32 at the stream rate (cleared audio too)."""
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)

    @property
    def agent_seconds(self) -> float:
        return sum(m.samples for m in self.agent_media) / self.rate

    def now(self) -> float:
        """Seconds since the socket opened."""
        return time.monotonic() - self._t0

    # ---- the call ----------------------------------------------------------------------------

    async def run(self, seconds: float, *, dtmf: Sequence[tuple[float, str]] = (), hangup: bool = True) -> None:
        """Connect, stream `seconds` of caller audio in real time (silence after the audio runs
        out), press `dtmf` keys at (seconds, digit), then send `stop` and close (`hangup`), or
        just close the socket (`hangup=False`: the carrier lost the connection). Returns early
        when the agent closes the socket. A refused upgrade raises aiohttp.WSServerHandshakeError."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.ws_connect(self.ws_url, headers=self.headers, autoclose=True,
                                       max_msg_size=4 * 1024 * 1024) as ws:
                self._ws, self._t0 = ws, time.monotonic()
                receiver = asyncio.create_task(self._receive())
                marks = asyncio.create_task(self._mark_loop())
                keys = [asyncio.create_task(self._press_at(t, d)) for t, d in dtmf]
                try:
                    await self._send(self._connected(), numbered=False)
                    await self._send(self._start())
                    self.started.set()
                    await self._stream(seconds, receiver)
                    if not receiver.done():
                        if hangup:
                            await self._send(self._stop())
                        self._closing = True
                        await ws.close()
                    try:  # the close handshake; a server that never answers is recorded, not fatal
                        await asyncio.wait_for(asyncio.shield(receiver), timeout=5.0)
                    except asyncio.TimeoutError:
                        self.protocol_errors.append("agent did not finish the close handshake in 5 s")
                finally:
                    for task in (receiver, marks, *keys):
                        task.cancel()
                    await asyncio.gather(receiver, marks, *keys, return_exceptions=True)
                    self.close_code = ws.close_code

    async def send_dtmf(self, digit: str) -> None:
        """Press a key now (as the carrier reports a caller's key press)."""
        self.dtmf_sent.append((self.now(), digit))
        await self._send(self._dtmf(digit))

    async def _press_at(self, at: float, digit: str) -> None:
        await self.started.wait()
        await asyncio.sleep(max(0.0, at - self.now()))
        await self.send_dtmf(digit)

    def _caller_frames(self, n: int) -> list[np.ndarray]:
        pcm = self.caller_pcm
        out = []
        for i in range(n):
            frame = pcm[i * self.frame_samples:(i + 1) * self.frame_samples]
            if len(frame) < self.frame_samples:
                frame = np.concatenate([frame, np.zeros(self.frame_samples - len(frame), np.float32)])
            out.append(frame)
        return out

    def _send_order(self, n: int) -> list[int]:
        """Indices of the frames in the order they go on the wire (subclasses may shuffle)."""
        return list(range(n))

    async def _stream(self, seconds: float, receiver: asyncio.Task) -> None:
        n = int(round(seconds / FRAME_S))
        frames = self._caller_frames(n)
        start = time.monotonic()
        for k, i in enumerate(self._send_order(n)):
            delay = start + (k - k % self.burst) * FRAME_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if receiver.done():  # the agent closed the socket
                return
            if self.mute_after is not None and k * FRAME_S >= self.mute_after:
                if self.muted_at is None:
                    self.muted_at = time.monotonic()
                continue
            if i + 1 in self.skip:
                continue
            if not await self._send(self._media(i + 1, frames[i])):
                return
            self.frames_sent += 1

    async def _send(self, msg: dict[str, Any], *, numbered: bool = True) -> bool:
        """Send one frame, numbering it (`seq_field`, counted over every numbered frame, in wire
        order) like the carrier does. False when the socket is already closed."""
        assert self._ws is not None
        async with self._send_lock:
            if self._ws.closed:
                return False
            if numbered:
                self._seq += 1
                msg = {"event": msg["event"], self.seq_field: str(self._seq),
                       **{k: v for k, v in msg.items() if k != "event"}}
            try:
                await self._ws.send_str(json.dumps(msg))
            except (ConnectionResetError, aiohttp.ClientConnectionError):
                return False
            return True

    # ---- what the agent sends ----------------------------------------------------------------

    async def _receive(self) -> None:
        assert self._ws is not None
        async for m in self._ws:
            if m.type == aiohttp.WSMsgType.TEXT:
                try:
                    await self._on_agent(json.loads(m.data))
                except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as e:
                    self.protocol_errors.append(f"bad frame from agent: {e}: {m.data[:120]}")
            elif m.type == aiohttp.WSMsgType.BINARY:
                self.protocol_errors.append(f"binary frame from agent ({len(m.data)} bytes)")
            else:
                break
        self.closed_by_server = not self._closing

    async def _on_agent(self, msg: dict[str, Any]) -> None:
        if not isinstance(msg, dict):
            raise TypeError("frame is not a JSON object")
        event = msg.get("event")
        self._check_stream_id(msg, event)
        t = time.monotonic()
        if event == "media":
            payload = msg["media"]["payload"]
            if not isinstance(payload, str):
                raise TypeError("media.payload is not a string")
            raw = base64.b64decode(payload, validate=True)
            if raw[:4] == b"RIFF":
                self.protocol_errors.append("media payload starts with a WAV header (raw audio only)")
            pcm = self._decode(raw)
            plays_at = self._playout.queue(t, len(pcm) / self.rate)
            self._chunks.append(pcm)
            self.agent_media.append(AgentMedia(t - self._t0, len(pcm), plays_at - self._t0))
        elif event == "mark":
            name = msg["mark"]["name"]
            if not isinstance(name, str):
                raise TypeError("mark.name is not a string")
            self.marks_received.append((t - self._t0, name))
            if self._playout.mark(t, name):
                await self._send_mark(name)
            else:
                self._wake.set()
        elif event == "clear":
            self.clears.append(t - self._t0)
            dropped, names = self._playout.clear(t)
            self.dropped_seconds += dropped
            for name in names:
                await self._send_mark(name)
        else:
            self.protocol_errors.append(f"unsupported event from agent: {str(event)[:40]!r}")

    async def _send_mark(self, name: str) -> None:
        self.marks_sent_back.append((self.now(), name))
        await self._send(self._mark(name))

    async def _mark_loop(self) -> None:
        """Send marks back as the audio queued before them finishes playing."""
        while True:
            for name in self._playout.due(time.monotonic()):
                await self._send_mark(name)
            pending = self._playout.pending
            timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    # ---- carrier specifics -------------------------------------------------------------------

    def _connected(self) -> dict[str, Any]: raise NotImplementedError
    def _start(self) -> dict[str, Any]: raise NotImplementedError
    def _media(self, chunk: int, pcm: np.ndarray) -> dict[str, Any]: raise NotImplementedError
    def _dtmf(self, digit: str) -> dict[str, Any]: raise NotImplementedError
    def _mark(self, name: str) -> dict[str, Any]: raise NotImplementedError
    def _stop(self) -> dict[str, Any]: raise NotImplementedError
    def _decode(self, payload: bytes) -> np.ndarray: raise NotImplementedError
    def _check_stream_id(self, msg: dict[str, Any], event: Any) -> None: raise NotImplementedError


class TwilioCaller(CarrierCaller):
    """A call arriving through Twilio `<Connect><Stream>`: u-law 8 kHz, `streamSid` in every
    frame both ways, `parameters` delivered as `start.customParameters`.

    `auth_token`: when given, the WebSocket upgrade carries an `X-Twilio-Signature` over the
    stream URL (no form parameters), as Twilio signs its requests, and (unless `grant=False`)
    the parameters carry the per-call grant our voice webhook would have put in its TwiML for
    this CallSid (made by the product's own `stream_grant`; the webhook path itself is tested
    through the webhook, see tests/e2e/test_carrier_auth.py)."""

    carrier = "twilio"
    seq_field = "sequenceNumber"

    def __init__(self, ws_url: str, *, stream_sid: str | None = None, call_sid: str | None = None,
                 account_sid: str | None = None, parameters: dict[str, str] | None = None,
                 wav_or_pcm: AudioSource = None, auth_token: str | None = None,
                 headers: dict[str, str] | None = None, grant: bool = True) -> None:
        headers = dict(headers or {})
        if auth_token is not None:
            headers[SIGNATURE_HEADER] = twilio_signature(auth_token, ws_url, {})
        super().__init__(ws_url, rate=8000, wav_or_pcm=wav_or_pcm, headers=headers)
        self.stream_sid = stream_sid or "MZ" + secrets.token_hex(16)
        self.call_sid = call_sid or "CA" + secrets.token_hex(16)
        self.account_sid = account_sid or "AC" + secrets.token_hex(16)
        self.parameters = dict(parameters or {})
        if auth_token is not None and grant and GRANT_PARAMETER not in self.parameters:
            self.parameters[GRANT_PARAMETER] = stream_grant(auth_token, self.call_sid, self.parameters,
                                                            int(time.time()) + 300)

    def _connected(self) -> dict[str, Any]:
        return {"event": "connected", "protocol": "Call", "version": "1.0.0"}

    def _start(self) -> dict[str, Any]:
        return {"event": "start", "start": {
            "accountSid": self.account_sid, "streamSid": self.stream_sid, "callSid": self.call_sid,
            "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": self.parameters}, "streamSid": self.stream_sid}

    def _media(self, chunk: int, pcm: np.ndarray) -> dict[str, Any]:
        return {"event": "media", "media": {
            "track": "inbound", "chunk": str(chunk), "timestamp": str(int(round((chunk - 1) * FRAME_S * 1000))),
            "payload": base64.b64encode(mulaw_encode(pcm)).decode()}, "streamSid": self.stream_sid}

    def _dtmf(self, digit: str) -> dict[str, Any]:
        return {"event": "dtmf", "streamSid": self.stream_sid,
                "dtmf": {"track": "inbound_track", "digit": digit}}

    def _mark(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}}

    def _stop(self) -> dict[str, Any]:
        return {"event": "stop", "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                "streamSid": self.stream_sid}

    def _decode(self, payload: bytes) -> np.ndarray:
        return mulaw_decode(payload)

    def _check_stream_id(self, msg: dict[str, Any], event: Any) -> None:
        if msg.get("streamSid") != self.stream_sid:
            self.protocol_errors.append(f"{event!r} frame with streamSid {msg.get('streamSid')!r}, "
                                        f"expected {self.stream_sid!r}")


class TelnyxCaller(CarrierCaller):
    """A call streamed by Telnyx (call control `streaming_start`, bidirectional `rtp` mode):
    PCMU 8 kHz by default, or `encoding="L16"` at `rate` 16000 (big-endian samples, RTP's
    network byte order). `caller`/`dialled` go in `start.from`/`start.to`, `parameters` in
    `start.custom_parameters`.

    `shuffle`: how far (in frames) media may be displaced on the wire, to exercise reordering
    (Telnyx does not guarantee frame order); frames keep their `media.chunk` numbers. `seed`
    makes the shuffle repeatable. `auth_token`: sent as `x-telnyx-streaming-auth-token` in the
    upgrade headers and in `connected`, as Telnyx does when a streaming auth token is set."""

    carrier = "telnyx"
    seq_field = "sequence_number"

    def __init__(self, ws_url: str, *, stream_id: str | None = None, call_control_id: str | None = None,
                 caller: str | None = "+13122010094", dialled: str | None = "+13122123456",
                 parameters: dict[str, str] | None = None, wav_or_pcm: AudioSource = None,
                 encoding: str = "PCMU", rate: int | None = None, shuffle: int = 0, seed: int = 0,
                 auth_token: str | None = None, headers: dict[str, str] | None = None) -> None:
        if encoding not in ("PCMU", "L16"):
            raise ValueError("TelnyxCaller speaks PCMU or L16")
        rate = rate or (8000 if encoding == "PCMU" else 16000)
        if encoding == "PCMU" and rate != 8000:
            raise ValueError("PCMU is 8000 Hz")
        headers = dict(headers or {})
        if auth_token is not None:
            headers["x-telnyx-streaming-auth-token"] = auth_token
        super().__init__(ws_url, rate=rate, wav_or_pcm=wav_or_pcm, headers=headers)
        self.encoding = encoding
        self.stream_id = stream_id or str(uuid.uuid4()).upper()
        self.call_control_id = call_control_id or "v3:" + secrets.token_urlsafe(40)
        self.caller, self.dialled = caller, dialled
        self.parameters = dict(parameters or {})
        self.shuffle, self.seed, self.auth_token = shuffle, seed, auth_token
        self.user_id = str(uuid.uuid4())

    def _send_order(self, n: int) -> list[int]:
        if self.shuffle <= 0:
            return list(range(n))
        rng = random.Random(self.seed)
        order = []
        block = self.shuffle + 1  # a permutation inside each block moves a frame < block places
        for b in range(0, n, block):
            part = list(range(b, min(n, b + block)))
            rng.shuffle(part)
            order += part
        return order

    def _connected(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"event": "connected", "version": "1.0.0"}
        if self.auth_token is not None:
            msg["x-telnyx-streaming-auth-token"] = self.auth_token
        return msg

    def _start(self) -> dict[str, Any]:
        start: dict[str, Any] = {
            "user_id": self.user_id, "call_control_id": self.call_control_id,
            "call_session_id": str(uuid.uuid4()), "tags": [],
            "custom_parameters": self.parameters,
            "media_format": {"encoding": self.encoding, "sample_rate": self.rate, "channels": 1}}
        if self.caller is not None:
            start["from"] = self.caller
        if self.dialled is not None:
            start["to"] = self.dialled
        return {"event": "start", "start": start, "stream_id": self.stream_id}

    def _encode(self, pcm: np.ndarray) -> bytes:
        if self.encoding == "PCMU":
            return mulaw_encode(pcm)
        return np.clip(np.rint(pcm * 32768), -32768, 32767).astype(">i2").tobytes()

    def _decode(self, payload: bytes) -> np.ndarray:
        if self.encoding == "PCMU":
            return mulaw_decode(payload)
        if len(payload) % 2:
            raise ValueError("L16 payload with an odd number of bytes")
        return np.frombuffer(payload, ">i2").astype(np.float32) / 32768

    def _media(self, chunk: int, pcm: np.ndarray) -> dict[str, Any]:
        return {"event": "media", "media": {
            "track": "inbound", "chunk": str(chunk), "timestamp": str(int(round((chunk - 1) * FRAME_S * 1000))),
            "payload": base64.b64encode(self._encode(pcm)).decode()}, "stream_id": self.stream_id}

    def _dtmf(self, digit: str) -> dict[str, Any]:
        occurred = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        return {"event": "dtmf", "stream_id": self.stream_id, "occurred_at": occurred,
                "dtmf": {"digit": digit}}

    def _mark(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "stream_id": self.stream_id, "mark": {"name": name}}

    def _stop(self) -> dict[str, Any]:
        return {"event": "stop",
                "stop": {"user_id": self.user_id, "call_control_id": self.call_control_id},
                "stream_id": self.stream_id}

    def _check_stream_id(self, msg: dict[str, Any], event: Any) -> None:
        # Telnyx's documented client frames carry no stream_id; one that is present must match.
        if "stream_id" in msg and msg["stream_id"] != self.stream_id:
            self.protocol_errors.append(f"{event!r} frame with stream_id {msg['stream_id']!r}, "
                                        f"expected {self.stream_id!r}")


# ---- the Twilio voice webhook -------------------------------------------------------------------

def twilio_voice_params(*, caller: str = "+14155550111", dialled: str = "+14155550100",
                        call_sid: str | None = None, account_sid: str | None = None,
                        **extra: str) -> dict[str, str]:
    """The form fields Twilio posts to a number's voice URL for a new inbound call."""
    params = {"AccountSid": account_sid or "AC" + secrets.token_hex(16), "ApiVersion": "2010-04-01",
              "CallSid": call_sid or "CA" + secrets.token_hex(16), "CallStatus": "ringing",
              "Called": dialled, "Caller": caller, "Direction": "inbound", "From": caller, "To": dialled}
    params.update(extra)
    return params


async def twilio_webhook_post(url: str, params: dict[str, str], auth_token: str | None = None,
                              *, signature: str | None = None) -> tuple[int, str]:
    """POST `params` as a form to `url`, as Twilio does when a call arrives, signed with
    `X-Twilio-Signature` (HMAC-SHA1 of the URL and sorted parameters) when `auth_token` is given
    (or with the given `signature`, to test forgeries). Returns (HTTP status, body text)."""
    headers = {}
    if signature is not None:
        headers[SIGNATURE_HEADER] = signature
    elif auth_token is not None:
        headers[SIGNATURE_HEADER] = twilio_signature(auth_token, url, params)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.post(url, data=params, headers=headers) as r:
            return r.status, await r.text()


async def twilio_stream_parameters(base_url: str, auth_token: str, **voice: str) -> dict[str, str]:
    """The <Parameter>s the agent's voice webhook answers a call with (the call's grant among
    them), for a call of `twilio_voice_params(**voice)` posted signed, as Twilio would."""
    status, body = await twilio_webhook_post(base_url + "/twilio/voice", twilio_voice_params(**voice), auth_token)
    assert status == 200, body
    return {unescape(n): unescape(v) for n, v in re.findall(r'<Parameter name="([^"]*)" value="([^"]*)"', body)}


async def serve_locally(handler) -> tuple[Any, int]:
    """An aiohttp server on 127.0.0.1 (a free port) answering every path with `handler`:
    (runner to clean up, port). Stands in for the far end in the wire tests."""
    from aiohttp import web

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]
