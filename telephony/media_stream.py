"""Carrier media streams over WebSocket: one transport for every carrier's wire format.

A carrier (Twilio `<Connect><Stream>`, Telnyx media streaming) opens a WebSocket to us per call
and speaks its own JSON frames; its module (`telephony.twilio`, `telephony.telnyx`) turns them
into `telephony.streams` events and back. Everything else is here, the same for all carriers:
- `start` -> the shared admission service (route by the `persona` parameter, else the dialled
  number); a refused call is closed with a close code from `admission.WS_CLOSE` and a reason;
- caller audio -> the call leg (reordered first when the carrier does not guarantee order);
- agent audio -> `media` frames of 20 ms, paced to real time, a `mark` after each agent frame so
  we know what the caller has heard, and never more than about 100 ms ahead of what the carrier
  reports played (once it echoes marks);
- barge-in -> `clear` (the carrier drops what it buffered);
- `stop`, a closed socket, or no media for `idle_timeout_s` end the call; the agent hangs up by
  closing the socket.
Malformed frames are logged and ignored; a stream that keeps sending them is closed. Nothing a
stream sends can touch another call.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Callable

import structlog
from aiohttp import WSMsgType, web

from agent.events import EndReason
from agent.metrics import Metrics
from agent.session import CallSession
from telephony.admission import WS_CLOSE, Admission, CallRequest, Refusal
from telephony.leg import CallLeg
from telephony.reorder import Reorderer
from telephony.streams import (Connected, DtmfIn, Ignored, MarkIn, MediaIn, MediaStreamProtocol, Started, Stopped,
                               WireError)
from telephony.wire import MAX_FRAME_CHARS

log = structlog.get_logger(__name__)

PACKET_S = 0.020  # carriers take and send 20 ms frames
PACKETS_PER_FRAME = 4  # one agent frame (80 ms) is four of them: a mark after each
LEAD_PACKETS = 2  # sent ahead of real time, so the carrier's playout never starves on jitter
MAX_AHEAD_S = 0.100  # never more than this ahead of what the carrier says it played (marks)
MAX_BAD_FRAMES = 50  # a stream sending more malformed frames than this in a row is closed


@dataclass(frozen=True)
class StreamSettings:
    idle_timeout_s: float = 10.0  # no caller media for this long ends the call


class StreamLeg(CallLeg):
    """One carrier stream's call: the shared leg plus pacing, marks and clear."""

    def __init__(self, ws: web.WebSocketResponse, proto: MediaStreamProtocol, started: Started,
                 session: CallSession, metrics: Metrics, out_rate: int):
        super().__init__(session, endpoint=proto.name, metrics=metrics, in_rate=started.audio.rate,
                         out_rate=out_rate, out_packet=int(out_rate * PACKET_S))
        self.ws = ws
        self.proto = proto
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.marks: collections.deque[tuple[str, int]] = collections.deque()  # sent, not yet played
        self.frames_sent = 0
        self.frames_heard = 0  # agent frames the carrier says it played
        self.marks_echoed = False
        self.last_media = time.monotonic()
        self.idle = False  # ended because the carrier stopped sending media
        self.sender = self.loop.create_task(self._send_loop())

    async def send(self, text: str) -> bool:
        if self.closed or self.ws.closed:
            return False
        try:
            await self.ws.send_str(text)
            return True
        except (ConnectionError, RuntimeError):
            return False

    async def _send_loop(self) -> None:
        """Agent audio at real-time pace, LEAD_PACKETS ahead, held back when the carrier's
        reported playout falls behind."""
        t0 = self.loop.time()
        n = 0
        try:
            while not self.closed:
                due = t0 + (n - LEAD_PACKETS) * PACKET_S
                wait = due - self.loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                elif wait < -0.2:  # the loop stalled: restart the clock rather than burst
                    t0, n = self.loop.time(), LEAD_PACKETS
                if self.marks_echoed and self.ahead_s() > MAX_AHEAD_S:
                    await asyncio.sleep(PACKET_S)
                    continue
                pkt = self.playout.next_packet()
                if not await self.send(self.proto.encode_media(pkt)):
                    return
                n += 1
                if n % PACKETS_PER_FRAME == 0:
                    self.frames_sent += 1
                    name = f"frame-{self.frames_sent}"
                    self.marks.append((name, self.frames_sent))
                    await self.send(self.proto.encode_mark(name))
        except asyncio.CancelledError:
            pass
        except Exception:
            self.session.log.exception("stream_send_failed")

    def ahead_s(self) -> float:
        """Agent audio sent but not yet reported played."""
        return (self.frames_sent - self.frames_heard) * PACKETS_PER_FRAME * PACKET_S

    def mark_played(self, name: str) -> None:
        self.marks_echoed = True
        while self.marks:
            sent, frame = self.marks.popleft()
            if sent == name:
                self.frames_heard = max(self.frames_heard, frame)
                return

    # -- leg reactions ----------------------------------------------------------------------------
    def flush_far_end(self) -> None:
        # the carrier plays out what it buffered unless told; it then echoes every pending mark
        self.loop.create_task(self.send(self.proto.encode_clear()))
        self.frames_heard = self.frames_sent
        self.marks.clear()

    def close(self, reason: EndReason) -> None:
        if not self.closed:
            self.session.log.info("stream_closed_by_agent", reason=reason.value)
            self.loop.create_task(self.shutdown(1000, reason.value))

    async def shutdown(self, code: int = 1000, message: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.sender.cancel()
        if not self.ws.closed:
            await self.ws.close(code=code, message=message.encode()[:120])


class MediaStreamTransport:
    """The WebSocket route of one carrier: one handler per stream."""

    def __init__(self, admission: Admission, metrics: Metrics, protocol: Callable[[], MediaStreamProtocol],
                 settings: StreamSettings, name: str):
        self.admission = admission
        self.metrics = metrics
        self.protocol = protocol
        self.settings = settings
        self.name = name
        self.legs: set[StreamLeg] = set()

    def route(self, started: Started) -> CallRequest:
        params = dict(started.parameters)
        dialled = params.pop("persona", None) or started.dialled
        for key in ("to", "To", "from", "From"):
            params.pop(key, None)
        return CallRequest(self.name, dialled, caller=started.caller, variables=params)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=4 * MAX_FRAME_CHARS, heartbeat=None)
        await ws.prepare(request)
        proto = self.protocol()
        slog = log.bind(endpoint=self.name, peer=request.remote)
        leg: StreamLeg | None = None
        reorder = Reorderer() if proto.reorders else None
        bad = 0
        watchdog = asyncio.get_running_loop().create_task(self._watch_idle(ws, lambda: leg))
        reason = EndReason.CALLER_GONE
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    if msg.type == WSMsgType.ERROR:
                        slog.warning("stream_socket_error", error=str(ws.exception()))
                    continue
                try:
                    ev = proto.parse(msg.data)
                except WireError as exc:
                    bad += 1
                    slog.warning("stream_bad_frame", error=str(exc)[:200], in_a_row=bad)
                    if bad > MAX_BAD_FRAMES:
                        await ws.close(code=1002, message=b"protocol error")
                        break
                    continue
                bad = 0
                if isinstance(ev, MediaIn):
                    if leg is not None:
                        leg.last_media = time.monotonic()
                        for m in (reorder.push(ev) if reorder is not None else [ev]):
                            leg.audio_in(m.pcm)
                elif isinstance(ev, Started):
                    if leg is not None:
                        continue
                    leg = await self._start(ws, proto, ev, slog)
                    if leg is None:
                        return ws
                elif isinstance(ev, DtmfIn):
                    if leg is not None:
                        leg.dtmf_in(ev.digit)
                elif isinstance(ev, MarkIn):
                    if leg is not None:
                        leg.mark_played(ev.name)
                elif isinstance(ev, Stopped):
                    reason = EndReason.CALLER_HANGUP
                    break
                elif isinstance(ev, (Connected, Ignored)):
                    if isinstance(ev, Ignored):
                        slog.debug("stream_frame_ignored", frame=ev.event[:200])
        finally:
            watchdog.cancel()
            if leg is not None:
                if reorder is not None:
                    for m in reorder.flush():
                        leg.audio_in(m.pcm)
                if leg.idle:
                    reason = EndReason.ENDPOINT_TIMEOUT
                leg.hangup(reason)
                await leg.shutdown()
                self.legs.discard(leg)
            elif not ws.closed:
                await ws.close()
        return ws

    async def _start(self, ws, proto: MediaStreamProtocol, started: Started, slog) -> StreamLeg | None:
        admitted = self.admission.admit(self.route(started))
        if isinstance(admitted, Refusal):
            slog.info("stream_refused", refusal=admitted.kind.value, reason=admitted.reason,
                      carrier_call_id=started.call_id)
            await ws.close(code=WS_CLOSE[admitted.kind], message=admitted.reason.encode()[:120])
            return None
        out = getattr(proto, "outbound", None) or started.audio
        leg = StreamLeg(ws, proto, started, admitted, self.metrics, out.rate)
        admitted.log.info("stream_started", carrier_call_id=started.call_id, stream_id=started.stream_id,
                          encoding=started.audio.encoding, rate=started.audio.rate)
        self.legs.add(leg)
        return leg

    async def _watch_idle(self, ws: web.WebSocketResponse, current: Callable[[], StreamLeg | None]) -> None:
        """No caller media for `idle_timeout_s` ends the call (a carrier that vanished)."""
        limit = self.settings.idle_timeout_s
        while not ws.closed:
            await asyncio.sleep(min(1.0, limit / 4))
            leg = current()
            if leg is not None and time.monotonic() - leg.last_media > limit:
                leg.session.log.warning("stream_idle_timeout", seconds=limit)
                leg.idle = True
                await ws.close(code=1000, message=b"no media")
                return

    async def stop(self) -> None:
        for leg in list(self.legs):
            await leg.shutdown(1001, "agent shutting down")
