"""WebRTC endpoint: SDP offer/answer over HTTP, one aiortc peer connection per call.

`POST /api/call` {sdp, type, persona} -> {sdp, type, call_id}; refusals come from the shared
admission service (`telephony.admission`: 404 unknown persona, 503 busy or draining with
Retry-After). Caller audio (Opus/PCMU/PCMA, 48 kHz, maybe stereo) goes to the call's leg, the
agent's frames back through `AgentAudioTrack`. The data channel ("events") speaks the documented
protocol in `telephony.webrtc.protocol`. The call's slot is freed whenever the call ends: page
hang-up, peer connection failed/closed, ICE timeout, or server drain.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import structlog
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from agent.events import CallEvent, EndReason
from agent.session import CallSession
from agent.security.limits import ClientLimits, MessageLimiter, client_address
from agent.security.tokens import TokenRejected, TokenVerifier
from telephony.admission import HTTP_STATUS, CallRequest, Refusal, RefusalKind
from telephony.leg import CallLeg
from agent.personas.schema import PersonaError
from telephony.webrtc.offer import drop_mdns_candidates
from telephony.webrtc.playground import Playground
from telephony.webrtc.protocol import PageDtmf, PageHangup, decode_page_message, encode_event, hello
from telephony.webrtc.tracks import PACKET, RATE, AgentAudioTrack

log = structlog.get_logger(__name__)
STATIC = Path(__file__).parent / "static"
NAME = "webrtc"


class WebRtcLeg(CallLeg):
    def __init__(self, endpoint: "WebRtcEndpoint", pc: RTCPeerConnection, session: CallSession, client: str):
        super().__init__(session, endpoint=NAME, metrics=endpoint.runtime.metrics, in_rate=None, out_rate=RATE,
                         out_packet=PACKET)
        self.owner = endpoint
        self.client = client  # the caller's address (per-client limits)
        lim = endpoint.runtime.cfg.webrtc.limits
        self.messages = MessageLimiter(lim.channel_max_bytes, lim.channel_max_per_s)
        self.pc = pc
        self.loop = asyncio.get_running_loop()
        self.channel = None
        self.tasks: set[asyncio.Task] = set()
        self.closed = False
        self.track = AgentAudioTrack(self.playout)
        pc.addTrack(self.track)
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_state)

    def spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- aiortc callbacks -----------------------------------------------------------------------
    def _on_track(self, track) -> None:
        if track.kind == "audio":
            self.spawn(self._consume(track))

    async def _consume(self, track) -> None:
        try:
            while True:
                self.frame_in(await track.recv())
        except MediaStreamError:
            pass
        except Exception:
            self.session.log.exception("webrtc_inbound_failed")
        self.hangup(EndReason.CALLER_GONE)

    def _on_datachannel(self, channel) -> None:
        self.channel = channel

        @channel.on("message")
        def on_message(message) -> None:
            dropped = self.messages.admit(message)
            if dropped is not None:  # junk, huge or a flood: never reaches call control
                self.metrics.datachannel_dropped.labels(dropped).inc()
                return
            msg = decode_page_message(message)
            if isinstance(msg, PageHangup):
                self.hangup(EndReason.CALLER_HANGUP)
            elif isinstance(msg, PageDtmf):
                self.dtmf_in(msg.digit)

        self._send(hello(self.session.state.value, self.session.call_id, self.session.persona.id))

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        self.session.log.info("webrtc_state", state=state)
        if state in ("failed", "closed"):
            self.hangup(EndReason.CONNECTION_LOST if state == "failed" else EndReason.CLOSED)
            await self.shutdown()

    def _send(self, payload: dict) -> None:
        ch = self.channel
        if ch is not None and ch.readyState == "open":
            try:
                ch.send(json.dumps(payload))
            except Exception:
                pass

    # -- leg reactions (event loop) -------------------------------------------------------------
    def forward(self, ev: CallEvent) -> None:
        msg = encode_event(ev)
        if msg is not None:
            self._send(msg)

    def close(self, reason: EndReason) -> None:
        self.spawn(self._close_soon())

    async def _close_soon(self) -> None:
        await asyncio.sleep(0.3)  # let the "ended" message reach the page
        await self.shutdown()

    async def watch_ice(self, timeout: float) -> None:
        await asyncio.sleep(timeout)
        if self.pc.connectionState not in ("connected",) and not self.closed:
            self.session.log.warning("webrtc_ice_timeout", state=self.pc.connectionState)
            self.hangup(EndReason.ICE_TIMEOUT)
            await self.shutdown()

    async def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.hangup(EndReason.CLOSED)
        self.owner.calls.discard(self)
        self.owner.limits.ended(self.client, self.session.call_id)
        try:
            await self.pc.close()
        except Exception:
            pass


def refusal_response(refusal: Refusal) -> web.Response:
    """A refused browser call: status from the shared table, JSON reason, Retry-After."""
    headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after else None
    return web.json_response({"error": refusal.kind.value, "reason": refusal.reason,
                              "retry_after": refusal.retry_after},
                             status=HTTP_STATUS[refusal.kind], headers=headers)


def bad_request(reason: str, code: str = "bad_request") -> web.Response:
    return web.json_response({"error": code, "reason": reason}, status=400)


class WebRtcEndpoint:
    name = NAME

    def __init__(self, runtime):
        self.runtime = runtime
        self.calls: set[WebRtcLeg] = set()
        self.playground = Playground(runtime)
        cfg = runtime.cfg.webrtc
        self.limits = ClientLimits(cfg.limits.concurrent_calls, cfg.limits.attempts_per_minute)
        secret = os.environ.get(cfg.tokens.secret_env) if cfg.tokens.secret_env else None
        if cfg.tokens.required and not secret:
            raise ValueError(f"webrtc.tokens.required is on but {cfg.tokens.secret_env or 'secret_env'} is not set")
        self.tokens = TokenVerifier(secret, cfg.tokens.max_ttl_s) if secret else None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/call", self.offer)
        app.router.add_get("/api/playground", self.playground.info)
        app.router.add_post("/api/playground/yaml", self.playground.save_yaml)
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", STATIC)

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    def _limited(self, client: str) -> web.Response | None:
        if not self.runtime.cfg.webrtc.limits.enabled:
            return None
        limited = self.limits.attempt(client)
        if limited is None:
            return None
        refusal = self.runtime.admission.refuse(NAME, RefusalKind.LIMITED, limited.reason, limited.retry_after)
        return refusal_response(refusal)

    def _grant(self, request: web.Request, body: dict, target: str):
        """The call token's grant (None: no token system, or none needed), or a 401 response."""
        if self.tokens is None:
            return None
        header = request.headers.get("Authorization", "")
        token = body.get("token") or (header[7:] if header.startswith("Bearer ") else None)
        if not token and not self.runtime.cfg.webrtc.tokens.required:
            return None
        route = self.runtime.route
        try:
            return self.tokens.verify(str(token) if token else None, target or None,
                                      matches=lambda asked, granted: route(asked) is not None
                                      and route(asked) is route(granted))
        except TokenRejected as exc:
            self.runtime.metrics.calls_total.labels(NAME, f"refused_token_{exc.reason}").inc()
            log.info("call_token_rejected", reason=exc.reason)
            return web.json_response({"error": "unauthorized", "reason": exc.reason, "detail": exc.detail},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})

    async def offer(self, request: web.Request) -> web.Response:
        rt = self.runtime
        client = client_address(request.remote, request.headers.get("X-Forwarded-For"),
                                rt.cfg.http.trusted_proxies)
        limited = self._limited(client)
        if limited is not None:
            return limited
        try:
            body = await request.json()
            offer = RTCSessionDescription(sdp=str(body["sdp"]), type=str(body.get("type", "offer")))
            target = str(body.get("persona") or body.get("number") or "")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # RecursionError: deep JSON
            return bad_request("expected JSON {sdp, type, persona}")
        if offer.type != "offer" or "m=audio" not in offer.sdp:
            return bad_request("expected an SDP offer with an audio stream")
        context = body.get("context")
        if context is not None and not isinstance(context, dict):
            return bad_request("context must be a JSON object of variables")
        grant = self._grant(request, body, target)
        if isinstance(grant, web.Response):
            return grant
        if grant is not None:  # the company's backend said who may call and what the agent knows
            target, context = target or grant.persona, grant.context
        persona = None
        if "playground" in body:  # ops staff trying a prompt: trusted once the playground lets them in
            refused = self.playground.refusal(request)
            if refused is not None:
                return refused
            try:
                persona = self.playground.persona(body["playground"])
            except PersonaError as exc:
                return web.json_response({"error": "invalid_persona", "reason": "the prompt form has problems",
                                          "problems": [str(i) for i in exc.issues]}, status=400)
        elif context and grant is None and not rt.cfg.webrtc.client_context:
            # browser callers are untrusted: their context is not the agent's knowledge
            log.info("client_context_ignored", variables=sorted(str(k) for k in context)[:20])
            context = None
        admitted = rt.admission.admit(CallRequest(NAME, target or None, variables=context or {}, persona=persona))
        if isinstance(admitted, Refusal):
            return refusal_response(admitted)
        session = admitted
        ice = [RTCIceServer(urls=u) for u in rt.cfg.webrtc.ice_servers]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice) if ice else None)
        leg = WebRtcLeg(self, pc, session, client)
        self.calls.add(leg)
        self.limits.started(client, session.call_id)
        clean = drop_mdns_candidates(offer.sdp)
        if clean.mdns_dropped:
            session.log.info("webrtc_mdns_candidates_dropped", count=clean.mdns_dropped)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=clean.sdp, type=offer.type))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as exc:
            session.log.warning("webrtc_bad_offer", error=str(exc))
            await leg.shutdown()
            return bad_request(f"cannot negotiate this offer: {exc}", "bad_offer")
        leg.spawn(leg.watch_ice(rt.cfg.webrtc.connect_timeout_s))
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                                  "call_id": session.call_id, "persona": session.persona.id})

    async def stop(self) -> None:
        for leg in list(self.calls):
            await leg.shutdown()
