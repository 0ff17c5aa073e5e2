"""WebRTC endpoint: SDP offer/answer over HTTP, one aiortc peer connection per call.

`POST /api/call` {sdp, type, persona} -> {sdp, type, call_id}; 404 for an unknown persona,
503 (JSON reason, Retry-After) when busy or draining. Caller audio (Opus/PCMU/PCMA, 48 kHz,
maybe stereo) is resampled to 24 kHz mono into the call's session; the agent's frames go back
through `AgentAudioTrack`. A data channel ("events") carries the agent's text, barge-ins and
call state to the page, and the page's hang-up to us. The call's slot is freed whenever the
call ends: page hang-up, peer connection failed/closed, ICE timeout, or server drain.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import structlog
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from agent.events import CallEvent, Ended, EndReason
from agent.scheduler import CallRefused
from agent.session import CallSession
from telephony.audio import FrameResampler, Playout
from telephony.webrtc.offer import drop_mdns_candidates
from telephony.webrtc.protocol import PageDtmf, PageHangup, decode_page_message, encode_event, hello
from telephony.webrtc.tracks import PACKET, RATE, AgentAudioTrack

log = structlog.get_logger(__name__)
STATIC = Path(__file__).parent / "static"
NAME = "webrtc"


class WebRtcCall:
    def __init__(self, endpoint: "WebRtcEndpoint", pc: RTCPeerConnection, session: CallSession):
        self.endpoint = endpoint
        self.pc = pc
        self.session = session
        self.loop = asyncio.get_running_loop()
        self.channel = None
        self.tasks: set[asyncio.Task] = set()
        self.closed = False
        metrics = endpoint.runtime.metrics
        self.playout = Playout(session, RATE, PACKET,
                               on_underrun=lambda cause: metrics.playout_underruns.labels(NAME, cause).inc())
        self.track = AgentAudioTrack(self.playout)
        pc.addTrack(self.track)
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)
        session.subscribe(self._on_event)

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _on_track(self, track) -> None:
        if track.kind == "audio":
            self._spawn(self._consume(track))

    async def _consume(self, track) -> None:
        resample = FrameResampler()
        try:
            while True:
                frame = await track.recv()
                pcm = resample(frame)
                if len(pcm):
                    self.session.push_audio(pcm)
        except MediaStreamError:
            pass
        except Exception:
            self.session.log.exception("webrtc_inbound_failed")
        self.session.hangup(EndReason.CALLER_GONE)

    def _on_datachannel(self, channel) -> None:
        self.channel = channel

        @channel.on("message")
        def on_message(message) -> None:
            msg = decode_page_message(message)
            if isinstance(msg, PageHangup):
                self.session.hangup(EndReason.CALLER_HANGUP)
            elif isinstance(msg, PageDtmf):
                self.session.dtmf(msg.digit)

        self._send(hello(self.session.state.value, self.session.call_id, self.session.persona.id))

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        self.session.log.info("webrtc_state", state=state)
        if state in ("failed", "closed"):
            self.session.hangup(EndReason.CONNECTION_LOST if state == "failed" else EndReason.CLOSED)
            await self.close()

    def _send(self, payload: dict) -> None:
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            try:
                ch.send(json.dumps(payload))
            except Exception:
                pass

    def _on_event(self, ev: CallEvent) -> None:
        # engine/VAD threads: hand over to the event loop
        self.loop.call_soon_threadsafe(self._handle_event, ev)

    def _handle_event(self, ev: CallEvent) -> None:
        msg = encode_event(ev)
        if msg is not None:
            self._send(msg)
        if isinstance(ev, Ended):
            self._spawn(self._close_soon())

    async def _close_soon(self) -> None:
        await asyncio.sleep(0.3)  # let the "ended" message reach the page
        await self.close()

    async def watch_ice(self, timeout: float) -> None:
        await asyncio.sleep(timeout)
        if self.pc.connectionState not in ("connected",) and not self.closed:
            self.session.log.warning("webrtc_ice_timeout", state=self.pc.connectionState)
            self.session.hangup(EndReason.ICE_TIMEOUT)
            await self.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.session.hangup(EndReason.CLOSED)
        self.endpoint.calls.discard(self)
        try:
            await self.pc.close()
        except Exception:
            pass


class WebRtcEndpoint:
    name = NAME

    def __init__(self, runtime):
        self.runtime = runtime
        self.calls: set[WebRtcCall] = set()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/call", self.offer)
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", STATIC)

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    def _refuse(self, status: int, code: str, reason: str, retry_after: int | None = None) -> web.Response:
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        return web.json_response({"error": code, "reason": reason, "retry_after": retry_after},
                                 status=status, headers=headers)

    async def offer(self, request: web.Request) -> web.Response:
        rt = self.runtime
        try:
            body = await request.json()
            offer = RTCSessionDescription(sdp=str(body["sdp"]), type=str(body.get("type", "offer")))
            target = str(body.get("persona") or body.get("number") or "")
        except (ValueError, KeyError, TypeError):
            return self._refuse(400, "bad_request", "expected JSON {sdp, type, persona}")
        if offer.type != "offer" or "m=audio" not in offer.sdp:
            return self._refuse(400, "bad_request", "expected an SDP offer with an audio stream")
        if rt.draining:
            rt.metrics.calls_total.labels(NAME, "refused_draining").inc()
            return self._refuse(503, "draining", "the agent is shutting down; try again shortly",
                                rt.cfg.engine.retry_after_s)
        persona = rt.route(target) if target else rt.registry.default
        if persona is None:
            rt.metrics.calls_total.labels(NAME, "not_found").inc()
            return self._refuse(404, "not_found", f"no persona answers {target!r}")
        try:
            session = rt.scheduler.place_call(persona, target or persona.id, NAME)
        except CallRefused as exc:
            status = 503
            return self._refuse(status, exc.code, exc.reason, exc.retry_after)
        ice = [RTCIceServer(urls=u) for u in rt.cfg.webrtc.ice_servers]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice) if ice else None)
        call = WebRtcCall(self, pc, session)
        self.calls.add(call)
        clean = drop_mdns_candidates(offer.sdp)
        if clean.mdns_dropped:
            session.log.info("webrtc_mdns_candidates_dropped", count=clean.mdns_dropped)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=clean.sdp, type=offer.type))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            session.log.warning("webrtc_bad_offer", error=str(exc))
            await call.close()
            return self._refuse(400, "bad_offer", f"cannot negotiate this offer: {exc}")
        call._spawn(call.watch_ice(rt.cfg.webrtc.connect_timeout_s))
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                                  "call_id": session.call_id, "persona": persona.id})

    async def stop(self) -> None:
        for call in list(self.calls):
            await call.close()
