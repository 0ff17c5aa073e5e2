"""A browser caller waiting in the call queue: answered peer connection, hold audio, its place.

Every slot is busy and the queue has room: the offer is answered at once (so the caller hears
hold audio through the outbound track it will keep for the call) and the data channel tells the
page its place (`{"type": "queue", "position": N}`), again whenever it moves. The ticket is
polled every 20 ms on the event loop; when the slot comes a `WebRtcLeg` adopts the same peer
connection, track, inbound audio and data channel, so the call starts like any other and the
caller's audio from that moment goes to the model. A page that hangs up, closes or goes silent
leaves the queue at once (abandoned); a ticket refused (over `max_wait_s`, the agent draining)
gets `{"type": "refused", ...}` and the connection is closed.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import numpy as np
import structlog
from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from agent.calls.events import EndReason
from telephony.admission import AdmittedCall, Refusal
from telephony.audio.hold import HoldAudio, HoldPlayer
from telephony.call_queue import Ticket
from telephony.security.limits import MessageLimiter
from telephony.webrtc.protocol import send, PageHangup, decode_page_message, queue_position, refused
from telephony.webrtc.tracks import RATE, AgentAudioTrack

if TYPE_CHECKING:
    from telephony.webrtc.transport import WebRtcLeg, WebRtcTransport

log = structlog.get_logger(__name__)
POLL_S = 0.020  # a slot that frees is taken within one packet
CLOSE_DELAY_S = 0.3  # lets the last data-channel message reach the page before the connection closes


class HoldSource:
    """Hold audio as the outbound track's source (what `Playout.next_packet` is to a call)."""

    def __init__(self, player: HoldPlayer):
        self.player = player

    def next_packet(self) -> np.ndarray:
        return self.player.take_packet()


class HeldCaller:
    def __init__(self, transport: "WebRtcTransport", pc: RTCPeerConnection, ticket: Ticket, client: str,
                 reservation: str | None, hold: HoldAudio, packet: int):
        self.owner = transport
        self.pc = pc
        self.ticket = ticket
        self.client = client
        self.reservation = reservation
        self.loop = asyncio.get_running_loop()
        self.track = AgentAudioTrack(HoldSource(hold.player(RATE, packet)), packet)  # type: ignore[arg-type]
        pc.addTrack(self.track)
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)
        lim = transport.cfg.limits
        self.messages = MessageLimiter(lim.channel_max_bytes, lim.channel_max_per_s)
        self.channel = None
        self.leg: WebRtcLeg | None = None
        self.closed = False
        self.sent_position = 0
        self.last_media: float | None = None  # armed once connected, as for a call
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def begin(self, connect_timeout_s: float) -> None:
        self.spawn(self._wait(connect_timeout_s))

    # -- aiortc callbacks (before and after the slot: the leg takes over from them) -------------
    def _on_track(self, track) -> None:
        if track.kind == "audio":
            self.spawn(self._consume(track))

    async def _consume(self, track) -> None:
        """Caller audio: dropped while waiting (the model hears nothing), the leg's once it
        exists; the end of the track ends the wait or the call."""
        try:
            while True:
                frame = await track.recv()
                leg = self.leg
                if leg is None:
                    self.last_media = time.monotonic()
                    continue
                leg.media_arrived()
                leg.frame_in(frame)
        except MediaStreamError:
            pass
        except Exception:
            log.exception("webrtc_inbound_failed")
        if self.leg is not None:
            self.leg.hangup(EndReason.CALLER_GONE)
        else:
            await self.leave()

    def _on_datachannel(self, channel) -> None:
        if self.leg is not None:  # opened after the slot came: the call's channel
            self.leg._on_datachannel(channel)
            return
        self.channel = channel

        @channel.on("message")
        def on_message(message) -> None:
            if self.leg is not None or self.messages.admit(message) is not None:
                return
            if isinstance(decode_page_message(message), PageHangup):
                self.spawn(self.leave())

        self._send_position()

    async def _on_state(self) -> None:
        if self.leg is not None:
            return
        state = self.pc.connectionState
        if state == "connected" and self.last_media is None:
            self.last_media = time.monotonic()
        if state in ("failed", "closed"):
            await self.leave()

    def _send(self, payload: dict) -> None:
        send(self.channel, payload)

    def _send_position(self) -> None:
        position = self.ticket.position
        if position and position != self.sent_position and self.channel is not None \
                and self.channel.readyState == "open":
            self.sent_position = position
            self._send(queue_position(position))

    # -- the wait ---------------------------------------------------------------------------------
    async def _wait(self, connect_timeout_s: float) -> None:
        opened = time.monotonic()
        media_timeout = self.owner.media_timeout_s
        while not self.closed:
            got = self.ticket.poll()
            if isinstance(got, AdmittedCall):
                return self._answered(got)
            if isinstance(got, Refusal):
                return await self._refused(got)
            if self.ticket.done:
                return
            now = time.monotonic()
            if self.pc.connectionState != "connected" and now - opened > connect_timeout_s:
                log.warning("webrtc_queue_ice_timeout", state=self.pc.connectionState)
                return await self.leave()
            if self.last_media is not None and now - self.last_media > media_timeout:
                log.info("webrtc_queue_media_timeout", seconds=media_timeout)
                return await self.leave()
            self._send_position()
            await asyncio.sleep(POLL_S)

    def _answered(self, admitted: AdmittedCall) -> None:
        owner = self.owner
        owner.held.discard(self)
        leg = owner.new_leg(self.pc, admitted, self.client, self.reservation, self.track.packet, track=self.track)
        self.reservation = None  # the leg gives it back when the call ends
        self.leg = leg
        leg.adopt(self.channel)
        leg.session.log.info("call_dequeued", queue_wait_s=leg.session.queue_wait_s)
        leg.start()

    async def _refused(self, refusal: Refusal) -> None:
        log.info("webrtc_queue_refused", refusal=refusal.kind.value, reason=refusal.reason)
        self._send(refused(refusal.kind.value, refusal.reason, refusal.retry_after))
        await asyncio.sleep(CLOSE_DELAY_S)
        await self._close()

    async def leave(self) -> None:
        """The caller went while waiting (or the agent stops): out of the queue at once
        (abandoned), the connection closed. Nothing once the slot came (the leg owns it)."""
        if self.leg is not None:
            return
        self.ticket.leave()
        await self._close()

    async def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.owner.held.discard(self)
        self.owner.release(self.client, self.reservation)
        self.reservation = None
        try:
            await self.pc.close()
        except Exception:
            pass
