"""WebRTC transport: SDP offer/answer over HTTP, one aiortc peer connection per call.

`POST /api/call` {sdp, type, persona} -> {sdp, type, call_id}; refusals come from the shared
admission service (`telephony.admission`: 404 unknown persona, 503 busy or draining with
Retry-After). Caller audio (Opus/PCMU/PCMA, 48 kHz, maybe stereo) goes to the call's leg, the
agent's frames back through `AgentAudioTrack`. The data channel ("events") speaks the documented
protocol in `telephony.webrtc.protocol`. The call's slot is freed whenever the call ends: page
hang-up, peer connection failed/closed, ICE timeout, or server drain.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from agent.calls.events import CallEvent, EndReason
from telephony.security.limits import ClientLimits, Limited, MessageLimiter, client_address, parse_networks
from telephony.security.tokens import CALLER_MESSAGES, CallGrant, TokenRejected, TokenVerifier
from telephony.security.secrets import env_secret
from telephony.admission import HTTP_STATUS, AdmittedCall, CallRequest, Refusal, RefusalKind
from telephony.call_queue import Ticket
from telephony.leg import CallLeg, LossKind
from agent.personas.schema import PersonaError
from telephony.webrtc.offer import ask_for_ptime, drop_mdns_candidates
from telephony.webrtc.playground import Playground
from telephony.webrtc.protocol import send, PageDtmf, PageHangup, decode_page_message, encode_event, hello
from telephony.transport import TransportContext
from telephony.webrtc.tracks import RATE, AgentAudioTrack, answered_audio_codec, packet_for_offer
from telephony.webrtc.held import HeldCaller

log = structlog.get_logger(__name__)
STATIC = Path(__file__).parent / "static"
NAME = "webrtc"


class CallerPackets:
    """How long the caller's packets are, from how many were sent (received and lost, by their
    sequence numbers) over the time since the first (20 ms until a second of them has been seen;
    kept between 10 and 120 ms, Opus's range)."""

    def __init__(self) -> None:
        self.seconds = 0.020
        self._first: tuple[float, int] | None = None

    def observe(self, now: float, received: int) -> None:
        if self._first is None:
            if received:
                self._first = (now, received)
            return
        t0, n0 = self._first
        if now - t0 >= 1.0 and received > n0:
            self.seconds = min(max((now - t0) / (received - n0), 0.010), 0.120)


class WebRtcLeg(CallLeg):
    def __init__(self, transport: "WebRtcTransport", pc: RTCPeerConnection, admitted: AdmittedCall, client: str,
                 reservation: str | None, packet: int, track: AgentAudioTrack | None = None):
        """`packet`: our packets' length for this caller (`packet_for_offer`); `track`: the
        outbound track of a caller who waited in the queue (`telephony.webrtc.held`): it plays
        this call's audio from now on, and the waiting caller's peer connection keeps feeding
        the inbound track and the data channel to this leg (`adopt`)."""
        if track is not None:
            packet = track.packet
        super().__init__(admitted, endpoint=NAME, metrics=transport.metrics, in_rate=None, out_rate=RATE,
                         out_packet=packet)
        self.owner = transport
        self.client = client  # the caller's address (per-client limits)
        self.reservation = reservation  # its place among the client's concurrent calls
        lim = transport.cfg.limits
        self.messages = MessageLimiter(lim.channel_max_bytes, lim.channel_max_per_s)
        self.pc = pc
        self.loop = asyncio.get_running_loop()
        self.channel = None
        self.tasks: set[asyncio.Task] = set()
        self.closed = False
        if track is None:
            self.track = AgentAudioTrack(self.playout, packet)
            pc.addTrack(self.track)
            pc.on("track", self._on_track)
            pc.on("datachannel", self._on_datachannel)
        else:
            self.track = track
            track.playout = self.playout  # hold audio -> the agent, on the same RTP stream
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
                frame = await track.recv()
                self.media_arrived()
                self.frame_in(frame)
        except MediaStreamError:
            pass
        except Exception:
            self.session.log.exception("webrtc_inbound_failed")
        self.hangup(EndReason.CALLER_GONE)

    async def _watch(self) -> None:
        """The media clock (`media_timeout_s`) and, every second, the RTP packets the network
        lost on the way in (the receiver's statistics), each as long as the caller's packets
        have been (what the answer asked for is a request: aiortc clients keep to 20 ms)."""
        timeout = self.owner.media_timeout_s
        seen_lost, last_read = 0, 0.0
        packet_s = CallerPackets()
        while not self.closed:
            await asyncio.sleep(min(0.25, timeout / 4))
            if self.media_timed_out(timeout):
                return
            now = self.loop.time()
            if now - last_read < 1.0:
                continue
            last_read = now
            lost = received = 0
            for receiver in self.pc.getReceivers():
                if receiver.track is not None and receiver.track.kind == "audio":
                    for st in (await receiver.getStats()).values():
                        if getattr(st, "type", None) == "inbound-rtp":
                            lost += max(int(st.packetsLost or 0), 0)
                            received += int(st.packetsReceived or 0)
            packet_s.observe(now, received + lost)
            if lost > seen_lost:
                self.count_lost(LossKind.NETWORK, (lost - seen_lost) * packet_s.seconds)
                seen_lost = lost

    def adopt(self, channel) -> None:
        """Take over from the queue: the data channel (if the page opened it already) and, once
        connected, the media clock."""
        if channel is not None:
            self._on_datachannel(channel)
        if self.pc.connectionState == "connected" and self.last_media is None:
            self.arm_media_watch()
            self.spawn(self._watch())

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
        if state == "connected" and self.last_media is None:
            # media is due from here on: a page closed without hanging up (no BYE, no
            # data-channel message) stops it; ICE consent alone would take half a minute
            self.arm_media_watch()
            self.spawn(self._watch())
        if state in ("failed", "closed"):
            self.hangup(EndReason.CONNECTION_LOST if state == "failed" else EndReason.CLOSED)
            await self.shutdown()

    def _send(self, payload: dict) -> None:
        send(self.channel, payload)

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
        self.owner.release(self.client, self.reservation)
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


def offer_problem(sdp: str) -> str | None:
    """Why this SDP offer is not one a caller's page makes (None: it is): exactly one audio
    section and at most one data channel (`application`); video and extra sections would make
    aiortc set up transports and decoders nobody asked for."""
    kinds = [line[2:].split(" ", 1)[0].strip().lower() for line in sdp.splitlines() if line.startswith("m=")]
    if kinds.count("audio") != 1:
        return "expected an SDP offer with exactly one audio stream"
    if kinds.count("application") > 1:
        return "expected at most one data channel section"
    others = sorted(set(kinds) - {"audio", "application"})
    if others:
        return f"this agent takes audio calls only (offer has {', '.join(others)})"
    return None


class _Refused(Exception):
    """A refusal decided while setting a call up: its response."""

    def __init__(self, response: web.Response):
        self.response = response


class WebRtcTransport:
    name = NAME

    def __init__(self, ctx: TransportContext):
        self.cfg = cfg = ctx.config
        self.admission = ctx.admission
        self.metrics = ctx.metrics
        self.media_timeout_s = ctx.media_timeout_s
        self.calls: set[WebRtcLeg] = set()
        self.held: set = set()  # telephony.webrtc.held.HeldCaller: browser callers in the queue
        self.can_wait = ctx.queue is not None and ctx.queue.max_waiting > 0
        self.hold_audio = ctx.hold_audio
        if self.can_wait and self.hold_audio is None:
            from telephony.audio.hold import HoldAudio

            self.hold_audio = HoldAudio.load(None)
        assert ctx.catalog is not None, "the WebRTC transport needs the catalog (the playground offers it)"
        self.playground = Playground(cfg, ctx.trusted_proxies, ctx.catalog)
        self.trusted = parse_networks(ctx.trusted_proxies)
        self.limits = ClientLimits(cfg.limits.concurrent_calls, cfg.limits.attempts_per_minute)
        # attempts refused before any slot was considered (junk, bad or missing tokens): their
        # own bucket, so they cannot use up the attempts of callers who hold valid tokens
        self.refused = ClientLimits(cfg.limits.concurrent_calls, cfg.limits.attempts_per_minute)
        secret = env_secret(cfg.tokens.secret_env)
        if cfg.tokens.required and not secret:  # the server's start check says so first
            raise ValueError(f"webrtc.tokens.required is on but {cfg.tokens.secret_env or 'secret_env'} is not set")
        self.tokens = TokenVerifier(secret, cfg.tokens.max_ttl_s, audience=cfg.tokens.audience,
                                    store=ctx.replay_store) if secret else None

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/call", self.offer)
        app.router.add_get("/api/playground", self.playground.info)
        app.router.add_post("/api/playground/yaml", self.playground.save_yaml)
        app.router.add_get("/", self.index)
        app.router.add_static("/static/", STATIC)

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def start(self) -> None:
        """Calls arrive on the public app's routes (added before it started)."""

    @property
    def _limits_on(self) -> bool:
        return self.cfg.limits.enabled

    def _limited(self, limited: Limited) -> _Refused:
        refusal = self.admission.refuse(NAME, RefusalKind.LIMITED, limited.reason, limited.retry_after)
        return _Refused(refusal_response(refusal))

    def _refused_attempt(self, client: str, response: web.Response) -> _Refused:
        """An attempt refused before admission: counted in the refused bucket; over it, 429."""
        if self._limits_on:
            limited = self.refused.count(client)
            if limited is not None:
                return self._limited(limited)
        return _Refused(response)

    def release(self, client: str, reservation: str | None) -> None:
        if reservation is not None:
            self.limits.ended(client, reservation)

    def _token_refused(self, client: str, exc: TokenRejected) -> _Refused:
        self.metrics.calls_total.labels(NAME, f"refused_token_{exc.reason}").inc()
        log.info("call_token_rejected", reason=exc.reason)
        return self._refused_attempt(client, web.json_response(
            {"error": "unauthorized", "reason": exc.reason, "detail": exc.detail,
             "message": CALLER_MESSAGES.get(exc.reason, exc.detail)},
            status=401, headers={"WWW-Authenticate": "Bearer"}))

    def _grant(self, request: web.Request, body: dict, target: str, client: str) -> CallGrant | None:
        """The call token's grant, checked but not yet used (None: no token system, or none
        given where none is needed)."""
        if self.tokens is None:
            return None
        header = request.headers.get("Authorization", "")
        token = body.get("token") or (header[7:] if header.startswith("Bearer ") else None)
        if not token and not self.cfg.tokens.required:
            return None
        route = self.admission.route
        try:
            return self.tokens.check(str(token) if token else None, target or None,
                                     matches=lambda asked, granted: route(asked) is not None
                                     and route(asked) is route(granted))
        except TokenRejected as exc:
            raise self._token_refused(client, exc) from None

    async def offer(self, request: web.Request) -> web.Response:
        client = client_address(request.remote, request.headers.getall("X-Forwarded-For", []), self.trusted)
        reservation: list[str | None] = [None]
        try:
            return await self._offer(request, client, reservation)
        except _Refused as refused:
            self.release(client, reservation[0])
            return refused.response

    async def _offer(self, request: web.Request, client: str, reservation: list[str | None]) -> web.Response:
        admission = self.admission
        try:
            body = await request.json()
            offer = RTCSessionDescription(sdp=str(body["sdp"]), type=str(body.get("type", "offer")))
            target = str(body.get("persona") or body.get("number") or "")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # RecursionError: deep JSON
            raise self._refused_attempt(client, bad_request("expected JSON {sdp, type, persona}")) from None
        problem = "expected an SDP offer" if offer.type != "offer" else offer_problem(offer.sdp)
        if problem:
            raise self._refused_attempt(client, bad_request(problem))
        context = body.get("context")
        if context is not None and not isinstance(context, dict):
            raise self._refused_attempt(client, bad_request("context must be a JSON object of variables"))
        grant = self._grant(request, body, target, client)
        if self._limits_on:
            held = self.limits.attempt(client)
            if isinstance(held, Limited):
                raise self._limited(held)
            reservation[0] = held
        if grant is not None:  # single use: only once the client is within its limits
            try:  # off the event loop: a shared store may take up to a second to say it is down
                await asyncio.to_thread(self.tokens.claim, grant)
            except TokenRejected as exc:
                raise self._token_refused(client, exc) from None
            # the company's backend said who may call and what the agent knows
            target, context = target or grant.persona, grant.context
        if "playground" in body:  # ops staff trying a prompt: trusted once the playground lets them in
            refused = self.playground.refusal(request)
            if refused is not None:
                raise _Refused(refused)
            try:
                persona = self.playground.persona(body["playground"])
            except PersonaError as exc:
                raise _Refused(web.json_response({"error": "invalid_persona", "reason": "the prompt form has problems",
                                                  "problems": [str(i) for i in exc.issues]}, status=400)) from None
        else:
            persona = admission.route(target or None)
            if persona is not None and not persona.browser and grant is None:
                # "phone lines only": a browser reaches it only with a token naming it
                raise _Refused(refusal_response(admission.refuse(
                    NAME, RefusalKind.FORBIDDEN, "this line takes phone calls only")))
            if context and grant is None and not self.cfg.client_context:
                # browser callers are untrusted: their context is not the agent's knowledge
                log.info("client_context_ignored", variables=sorted(str(k) for k in context)[:20])
                context = None
        admitted = admission.admit(CallRequest(NAME, target or None, variables=context or {}, persona=persona,
                                               can_wait=self.can_wait))
        if isinstance(admitted, Refusal):
            raise _Refused(refusal_response(admitted))
        ice = [RTCIceServer(urls=u) for u in self.cfg.ice_servers]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=ice) if ice else None)
        if isinstance(admitted, Ticket):
            return await self._hold(pc, offer, admitted, client, reservation)
        session = admitted.session
        leg = self.new_leg(pc, admitted, client, reservation[0], packet_for_offer(offer.sdp))
        reservation[0] = None  # the leg gives it back when the call ends
        leg.start()  # its prompt into the model while the offer is negotiated
        clean = drop_mdns_candidates(offer.sdp)
        if clean.mdns_dropped:
            session.log.info("webrtc_mdns_candidates_dropped", count=clean.mdns_dropped)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=clean.sdp, type=offer.type))
            await pc.setLocalDescription(await pc.createAnswer())
            codec = answered_audio_codec(pc.localDescription.sdp)
            leg.track.sends(codec)
        except Exception as exc:
            # the library's words stay in our log: they describe our internals, not the caller's offer
            session.log.warning("webrtc_bad_offer", error=type(exc).__name__, detail=str(exc)[:200])
            await leg.shutdown()
            return bad_request("cannot negotiate this offer (audio: Opus, PCMU or PCMA)", "bad_offer")
        session.log.info("webrtc_media", **leg.track.media(codec), caller_ptime_ms=self.cfg.caller_ptime_ms)
        leg.spawn(leg.watch_ice(self.cfg.connect_timeout_s))
        return web.json_response({"sdp": self.answer_sdp(pc), "type": pc.localDescription.type,
                                  "call_id": session.call_id, "persona": session.persona.id})

    def answer_sdp(self, pc: RTCPeerConnection) -> str:
        """Our answer as the caller gets it: asking for `webrtc.caller_ptime_ms` packets."""
        return ask_for_ptime(pc.localDescription.sdp, self.cfg.caller_ptime_ms)

    def new_leg(self, pc: RTCPeerConnection, admitted: AdmittedCall, client: str, reservation: str | None,
                packet: int, track=None) -> "WebRtcLeg":
        """The leg of an admitted call, one of this transport's calls from now on (it gives the
        client's `reservation` back when the call ends); a caller answered off the queue brings
        the track it was held on (and its packet length)."""
        leg = WebRtcLeg(self, pc, admitted, client, reservation, packet, track=track)
        self.calls.add(leg)
        return leg

    async def _hold(self, pc: RTCPeerConnection, offer: RTCSessionDescription, ticket: Ticket, client: str,
                    reservation: list[str | None]) -> web.Response:
        """Every slot busy, the queue has room: answer the offer now, hold audio on the outbound
        track and the caller's place on the data channel until the slot comes
        (`telephony.webrtc.held`)."""
        held = HeldCaller(self, pc, ticket, client, reservation[0], self.hold_audio, packet_for_offer(offer.sdp))
        reservation[0] = None  # the held caller (then its leg) gives it back
        self.held.add(held)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=drop_mdns_candidates(offer.sdp).sdp,
                                                                type=offer.type))
            await pc.setLocalDescription(await pc.createAnswer())
            codec = answered_audio_codec(pc.localDescription.sdp)
            held.track.sends(codec)
        except Exception as exc:
            log.warning("webrtc_bad_offer", error=type(exc).__name__, detail=str(exc)[:200])
            await held.leave()
            return bad_request("cannot negotiate this offer (audio: Opus, PCMU or PCMA)", "bad_offer")
        log.info("webrtc_media", **held.track.media(codec), caller_ptime_ms=self.cfg.caller_ptime_ms)
        held.begin(self.cfg.connect_timeout_s)
        log.info("webrtc_queued", position=ticket.position)
        return web.json_response({"sdp": self.answer_sdp(pc), "type": pc.localDescription.type,
                                  "queued": True, "position": ticket.position,
                                  "persona": getattr(ticket.persona, "id", None)})

    async def stop(self) -> None:
        for held in list(self.held):  # (draining refused them already: the backstop)
            await held.leave()
        for leg in list(self.calls):
            await leg.shutdown()
