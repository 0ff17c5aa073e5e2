"""Carrier media streams over WebSocket: one transport for every carrier's wire format.

A carrier (Twilio `<Connect><Stream>`, Telnyx media streaming) opens a WebSocket to us per call
and speaks its own JSON frames; its module (`telephony.streams.twilio`, `telephony.streams.telnyx`) turns them
into `telephony.streams.events` events and back. Everything else is here, the same for all carriers:
- `start` -> the shared admission service (route by the `persona` parameter, else the dialled
  number); a refused call is closed with a close code from `admission.WS_CLOSE` and a reason;
- caller audio -> the call leg (reordered first when the carrier does not guarantee order);
- agent audio -> `media` frames of 40 ms (both carriers take any length; half as many sends and
  marks as 20 ms frames: 14-17% less CPU per call, the README's capacity section), paced to
  real time, a `mark` after each agent frame so we know what the caller has heard, and never
  more than about 100 ms ahead of what the carrier reports played (once it echoes marks);
- barge-in -> `clear` (the carrier drops what it buffered);
- `stop` or a closed socket ends the call, and no media frame for `media_timeout_s` ends it with
  `media_timeout`; the agent hangs up by closing the socket;
- every slot busy and the call queue has room (`queue.max_waiting`): the stream stays open and
  the caller hears hold audio (`media` frames at the same 40 ms pace, the carrier's codec and
  rate; nothing reaches the model) while its ticket is polled every packet; once admitted the
  call starts like any other; `stop` or a closed socket while waiting leaves the queue
  (abandoned); a ticket refused (over `max_wait_s`, the agent draining) closes the socket as a
  refused `start` is closed (1013: try again later).
Malformed frames are logged and ignored; a stream that keeps sending them is closed. Nothing a
stream sends can touch another call. Before `start` is admitted the carrier's own check runs
(`StartCheck`: Telnyx's stream token, Twilio's per-call grant); a socket that has not sent an
admitted `start` within START_TIMEOUT_S is closed (1008), so strangers cannot hold sockets open.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Callable

import structlog
from aiohttp import WSMsgType, web

from agent.calls.events import EndReason
from agent.metrics import Metrics
from telephony.admission import AdmittedCall, WS_CLOSE, Admission, CallRequest, Refusal, RefusalKind
from telephony.audio.hold import HoldAudio
from telephony.audio.pacer import Pacer
from telephony.call_queue import Ticket
from telephony.leg import CallLeg, LossKind
from telephony.streams.reorder import Reorderer
from telephony.streams.events import (Connected, DtmfIn, Ignored, MarkIn, MediaIn, MediaStreamProtocol, Started, Stopped,
                               WireError)
from telephony.streams.wire import MAX_FRAME_CHARS

log = structlog.get_logger(__name__)

PACKET_S = 0.040  # what we send: carriers send 20 ms frames and take any length
CALLER_FRAME_S = 0.020  # what carriers send (until a frame says otherwise)
PACKETS_PER_FRAME = 2  # one agent frame (80 ms) is two of them: a mark after each
LEAD_PACKETS = 1  # sent ahead of real time (40 ms), so the carrier's playout never starves on jitter
MAX_AHEAD_S = 0.100  # never more than this ahead of what the carrier says it played (marks)
MAX_BAD_FRAMES = 50  # a stream sending more malformed frames than this in a row is closed
START_TIMEOUT_S = 5.0  # a socket without an admitted `start` by then is closed (1008)

#: The carrier's check of a stream before its `start` is admitted: (the upgrade request, the
#: `connected` frame if one came, the `start`) -> why it is refused, or None.
StartCheck = Callable[[web.Request, Connected | None, Started], str | None]


@dataclass(frozen=True)
class StreamSettings:
    media_timeout_s: float  # no caller media for this long ends the call (`ServerConfig.media_timeout_s`)
    can_wait: bool = False  # the call queue is on: a busy agent holds the stream instead of refusing it
    hold_audio: HoldAudio | None = None  # what a held caller hears (the built-in chime when None)


class HeldStream:
    """A stream whose caller waits in the call queue: hold audio out at the live pace, the ticket
    polled before every packet (a slot that frees is taken within one packet, 40 ms). It ends with the
    admitted call, a refusal, or None when the caller left (`leave`)."""

    def __init__(self, ws: web.WebSocketResponse, proto: MediaStreamProtocol, ticket: Ticket,
                 hold: HoldAudio, out_rate: int):
        self.ws = ws
        self.proto = proto
        self.ticket = ticket
        self.player = hold.player(out_rate, int(out_rate * PACKET_S))
        self.last_media = time.monotonic()  # a carrier that vanished while waiting is abandoned too
        self.packets = 0

    def media_arrived(self) -> None:
        self.last_media = time.monotonic()

    def media_timed_out(self, timeout_s: float) -> bool:
        return time.monotonic() - self.last_media > timeout_s

    async def wait(self) -> AdmittedCall | Refusal | None:
        pacer = Pacer(PACKET_S, lead=LEAD_PACKETS)
        while not self.ws.closed:
            got = self.ticket.poll()
            if got is not None:
                return got
            if self.ticket.done:  # left (socket closed, `stop`)
                return None
            await pacer.wait()
            try:
                await self.ws.send_str(self.proto.encode_media(self.player.take_packet()))
            except (ConnectionError, RuntimeError):
                return None
            self.packets += 1
        return None

    def leave(self) -> None:
        """The caller went while waiting: out of the queue at once (abandoned; a no-op once the
        ticket was answered or refused)."""
        self.ticket.leave()


class StreamLeg(CallLeg):
    """One carrier stream's call: the shared leg plus pacing, marks and clear."""

    def __init__(self, ws: web.WebSocketResponse, proto: MediaStreamProtocol, started: Started,
                 admitted: AdmittedCall, metrics: Metrics, out_rate: int):
        super().__init__(admitted, endpoint=proto.name, metrics=metrics, in_rate=started.audio.rate,
                         out_rate=out_rate, out_packet=int(out_rate * PACKET_S))
        self.ws = ws
        self.proto = proto
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.marks: collections.deque[tuple[str, int]] = collections.deque()  # sent, not yet played
        self.frames_sent = 0
        self.frames_heard = 0  # agent frames the carrier says it played
        self.marks_echoed = False
        self.arm_media_watch()  # media is due from the `start` on
        self.capture_rate = started.audio.rate
        self._frame_samples = int(started.audio.rate * CALLER_FRAME_S)
        self._seen_gaps = 0  # the reorderer's gaps already counted as lost
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
        pacer = Pacer(PACKET_S, lead=LEAD_PACKETS)
        try:
            while not self.closed:
                n = await pacer.wait() + 1  # packets sent once this one is
                if self.marks_echoed and self.ahead_s() > MAX_AHEAD_S:
                    pacer.hold()
                    await asyncio.sleep(PACKET_S)
                    continue
                pkt = self.playout.next_packet()
                if not await self.send(self.proto.encode_media(pkt)):
                    return
                if n % PACKETS_PER_FRAME == 0:
                    self.frames_sent += 1
                    name = f"frame-{self.frames_sent}"
                    self.marks.append((name, self.frames_sent))
                    await self.send(self.proto.encode_mark(name))
        except asyncio.CancelledError:
            pass
        except Exception:
            self.session.log.exception("stream_send_failed")

    def reordered_in(self, reorder: Reorderer, frames: list[MediaIn], samples: int) -> None:
        """Frames the reorderer released, to the call; the sequence numbers it gave up since the
        last frame are counted as lost, frames the length of the last one."""
        for m in frames:
            self.audio_in(m.pcm)
            self._frame_samples = len(m.pcm) or self._frame_samples
        st = reorder.stats
        frame_s = (samples or self._frame_samples) / self.capture_rate
        gaps, self._seen_gaps = st.gaps_skipped - self._seen_gaps, st.gaps_skipped
        self.count_lost(LossKind.REORDER_GAP, gaps * frame_s)

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
        if self.marks_echoed:  # as far as its marks tell (a carrier that never echoes them: unknown)
            self.count_flushed(self.ahead_s())
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


class MediaStreamHandler:
    """The WebSocket route of one carrier: one handler per stream."""

    def __init__(self, admission: Admission, metrics: Metrics, protocol: Callable[[], MediaStreamProtocol],
                 settings: StreamSettings, name: str, check_start: StartCheck | None = None,
                 credentials: tuple[str, ...] = ()):
        self.check_start = check_start
        self.credentials = credentials  # parameters that prove a right to start: never call variables
        self.admission = admission
        self.metrics = metrics
        self.protocol = protocol
        self.settings = settings
        self.name = name
        self.legs: set[StreamLeg] = set()
        self.held: set[HeldStream] = set()
        self.hold_audio = settings.hold_audio or (HoldAudio.load(None) if settings.can_wait else None)

    def route(self, started: Started) -> CallRequest:
        params = dict(started.parameters)
        dialled = params.pop("persona", None) or started.dialled
        for key in ("to", "To", "from", "From", *self.credentials):
            params.pop(key, None)
        return CallRequest(self.name, dialled, caller=started.caller, variables=params,
                           can_wait=self.settings.can_wait)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=4 * MAX_FRAME_CHARS, heartbeat=None)
        await ws.prepare(request)
        proto = self.protocol()
        slog = log.bind(endpoint=self.name, peer=request.remote)
        call = _StreamCall()
        reorder = Reorderer() if proto.reorders else None
        bad = 0
        connected: Connected | None = None
        watchdog = asyncio.get_running_loop().create_task(self._watch_idle(ws, call))
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
                leg = call.leg
                if isinstance(ev, MediaIn):
                    if leg is not None:
                        leg.media_arrived()
                        if reorder is None:
                            leg.audio_in(ev.pcm)
                        else:
                            leg.reordered_in(reorder, reorder.push(ev), len(ev.pcm))
                    elif call.held is not None:  # on hold: the model hears nothing yet
                        call.held.media_arrived()
                elif isinstance(ev, Started):
                    if leg is not None or call.held is not None:
                        continue
                    started = await self._start(ws, proto, ev, slog, request, connected, call)
                    if not started:
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
                elif isinstance(ev, Connected):
                    connected = connected or ev
                elif isinstance(ev, Ignored):
                    slog.debug("stream_frame_ignored", frame=ev.event[:200])
        finally:
            watchdog.cancel()
            call.closed = True
            held, leg = call.held, call.leg
            if held is not None:  # still waiting: the caller went (abandoned)
                call.held = None
                held.leave()
                self.held.discard(held)
                slog.info("stream_left_queue", waited_s=round(held.ticket.waited_s, 3))
            if call.hold_task is not None:
                call.hold_task.cancel()
            if leg is not None:
                if reorder is not None:
                    leg.reordered_in(reorder, reorder.flush(), 0)
                leg.hangup(reason)  # after a media timeout: that reason stands (the first wins)
                await leg.shutdown()
                self.legs.discard(leg)
            elif not ws.closed:
                await ws.close()
        return ws

    async def _start(self, ws, proto: MediaStreamProtocol, started: Started, slog, request: web.Request,
                     connected: Connected | None, call: "_StreamCall") -> bool:
        """Admit the `start`: a live leg, a held stream (queue), or a refusal (False: the socket
        was closed)."""
        problem = None
        if self.check_start is not None:  # off the event loop: a shared replay store may take up to a second
            problem = await asyncio.to_thread(self.check_start, request, connected, started)
        if problem is not None:
            refusal = self.admission.refuse(self.name, RefusalKind.UNAUTHORIZED, problem)
            await ws.close(code=WS_CLOSE[refusal.kind], message=b"unauthorized")
            return False
        admitted = self.admission.admit(self.route(started))
        if isinstance(admitted, Refusal):
            await self._refused(ws, admitted, slog, started)
            return False
        out = getattr(proto, "outbound", None) or started.audio
        if isinstance(admitted, Ticket):
            assert self.hold_audio is not None  # can_wait implies hold audio (see __init__)
            held = HeldStream(ws, proto, admitted, self.hold_audio, out.rate)
            call.held = held
            self.held.add(held)
            slog.info("stream_queued", position=admitted.position, carrier_call_id=started.call_id)
            call.hold_task = asyncio.get_running_loop().create_task(
                self._hold(ws, proto, started, call, held, slog, out.rate))
            return True
        call.leg = self._live(ws, proto, started, admitted, out.rate)
        return True

    def _live(self, ws, proto: MediaStreamProtocol, started: Started, admitted: AdmittedCall,
              out_rate: int) -> StreamLeg:
        leg = StreamLeg(ws, proto, started, admitted, self.metrics, out_rate)
        admitted.session.log.info("stream_started", carrier_call_id=started.call_id, stream_id=started.stream_id,
                                  encoding=started.audio.encoding, rate=started.audio.rate)
        self.legs.add(leg)
        leg.start()
        return leg

    async def _refused(self, ws, refusal: Refusal, slog, started: Started) -> None:
        slog.info("stream_refused", refusal=refusal.kind.value, reason=refusal.reason,
                  carrier_call_id=started.call_id)
        await ws.close(code=WS_CLOSE[refusal.kind], message=refusal.reason.encode()[:120])

    async def _hold(self, ws, proto: MediaStreamProtocol, started: Started, call: "_StreamCall",
                    held: HeldStream, slog, out_rate: int) -> None:
        """The held caller's wait, then its call (or its refusal); caller media keeps arriving
        meanwhile on the handler's loop, and goes to the leg from the moment it exists."""
        try:
            got = await held.wait()
        except asyncio.CancelledError:
            return
        except Exception:
            slog.exception("stream_hold_failed")
            got = None
        self.held.discard(held)
        if call.held is held:
            call.held = None
        if isinstance(got, AdmittedCall):
            if call.closed or ws.closed:  # the socket went as the slot came: end the call at once
                got.session.hangup(EndReason.CALLER_GONE)
                return
            call.leg = leg = self._live(ws, proto, started, got, out_rate)
            leg.session.log.info("call_dequeued", queue_wait_s=leg.session.queue_wait_s, hold_packets=held.packets)
        elif isinstance(got, Refusal):
            await self._refused(ws, got, slog, started)
        elif not ws.closed:
            await ws.close()

    async def _watch_idle(self, ws: web.WebSocketResponse, call: "_StreamCall") -> None:
        """No admitted `start` within START_TIMEOUT_S closes the socket; no caller media for
        `media_timeout_s` ends the call (a carrier that vanished): `media_timeout`, or, while
        on hold, leaves the queue (abandoned)."""
        limit = self.settings.media_timeout_s
        opened = time.monotonic()
        while not ws.closed:
            await asyncio.sleep(min(0.5, limit / 4))
            leg, held = call.leg, call.held
            if held is not None:
                if held.media_timed_out(limit):
                    log.info("stream_hold_media_timeout", endpoint=self.name, seconds=limit)
                    held.leave()
                    await ws.close(code=1000, message=b"no media")
                    return
                continue
            if leg is None and call.hold_task is None and time.monotonic() - opened > START_TIMEOUT_S:
                log.info("stream_start_timeout", endpoint=self.name, seconds=START_TIMEOUT_S)
                self.metrics.calls_total.labels(self.name, "refused_no_start").inc()
                await ws.close(code=1008, message=b"no start")
                return
            if leg is not None and leg.media_timed_out(limit):
                await leg.shutdown(1000, "no media")
                return

    async def stop(self) -> None:
        for held in list(self.held):  # (draining refused them already; this is the backstop)
            held.leave()
            if not held.ws.closed:
                await held.ws.close(code=WS_CLOSE[RefusalKind.DRAINING], message=b"agent shutting down")
        for leg in list(self.legs):
            await leg.shutdown(1001, "agent shutting down")


@dataclass
class _StreamCall:
    """What one socket has become: nothing yet, a caller on hold, or a live call."""

    leg: StreamLeg | None = None
    held: HeldStream | None = None
    hold_task: asyncio.Task | None = None
    closed: bool = False
