"""Listen-in: a supervisor hears a live call (caller and agent mixed) in the browser over WebRTC.

Receive-only by construction: the server's peer connection has one outgoing audio track (the
mix) and nothing that reads what the browser might send, so no supervisor audio can reach the
call or its caller. The mix comes from the call's frame tap (what the model consumed and
produced, 80 ms at 24 kHz, on the engine thread): the tap only copies into each listener's small
bounded buffer, and does nothing at all while nobody listens. A listener that falls behind loses
its oldest audio, never the call's time.
"""

from __future__ import annotations

import collections
import fractions
import threading

import av
import numpy as np
import structlog
from aiohttp import web

from agent.calls.events import Ended
from agent.calls.session import CallSession
from agent.timebase import SAMPLE_RATE
from server.console.auth import signed_in
from telephony.audio.codecs import float_to_int16
from telephony.audio.pacer import Pacer

log = structlog.get_logger(__name__)

PACKET = SAMPLE_RATE // 50  # 20 ms at 24 kHz: what the track hands the Opus encoder
#: 80 ms frames a listener may have waiting (about a second) before its oldest are dropped
BUFFERED_FRAMES = 12


class MixTrack:
    """The call's two sides, mixed, as an aiortc audio track paced in real time (silence while
    the call gives nothing)."""

    def __init__(self):
        from aiortc import MediaStreamTrack

        class _Track(MediaStreamTrack):
            kind = "audio"

            async def recv(inner) -> av.AudioFrame:  # noqa: N805 - the track is `inner`
                return await self._recv(inner)

        self.track = _Track()
        self._frames: collections.deque[np.ndarray] = collections.deque(maxlen=BUFFERED_FRAMES)
        self._lock = threading.Lock()
        self._pending = np.zeros(0, np.float32)
        self._pacer = Pacer(PACKET / SAMPLE_RATE)  # the transports' clock rule (telephony.audio.pacer)

    def push(self, frame: np.ndarray) -> None:
        """Engine thread: one 80 ms mixed frame."""
        with self._lock:
            self._frames.append(frame)

    async def _recv(self, track) -> av.AudioFrame:
        if track.readyState != "live":
            from aiortc.mediastreams import MediaStreamError

            raise MediaStreamError
        pts = await self._pacer.wait() * PACKET
        if len(self._pending) < PACKET:
            with self._lock:
                more = list(self._frames)
                self._frames.clear()
            self._pending = np.concatenate([self._pending, *more]) if more else self._pending
        if len(self._pending) >= PACKET:
            pcm, self._pending = self._pending[:PACKET], self._pending[PACKET:]
        else:
            pcm = np.zeros(PACKET, np.float32)
        frame = av.AudioFrame.from_ndarray(float_to_int16(pcm)[None, :], format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        return frame


class ListenHub:
    """Who listens to which call: the frame tap of every call looks here first."""

    def __init__(self) -> None:
        self._by_call: dict[str, set[MixTrack]] = {}
        self._pcs: dict[str, set] = {}

    def attach(self, sess: CallSession) -> None:
        """A scheduler `on_call_start` hook."""
        call_id = sess.call_id

        def tap(caller: np.ndarray | None, agent: np.ndarray, text: str | None, index: int) -> None:
            listeners = self._by_call.get(call_id)
            if not listeners:
                return
            mix = agent.astype(np.float32) if caller is None else (caller + agent).astype(np.float32) * 0.7
            for m in list(listeners):
                m.push(mix)

        def on_event(ev) -> None:
            if isinstance(ev, Ended):
                self._by_call.pop(call_id, None)

        sess.add_frame_tap(tap)
        sess.subscribe(on_event)

    def listeners(self, call_id: str) -> int:
        return len(self._by_call.get(call_id, ()))

    def add(self, call_id: str, mix: MixTrack, pc) -> None:
        self._by_call.setdefault(call_id, set()).add(mix)
        self._pcs.setdefault(call_id, set()).add(pc)

    def remove(self, call_id: str, mix: MixTrack, pc) -> None:
        self._by_call.get(call_id, set()).discard(mix)
        self._pcs.get(call_id, set()).discard(pc)

    async def close(self) -> None:
        for pcs in list(self._pcs.values()):
            for pc in list(pcs):
                await pc.close()
        self._pcs.clear()
        self._by_call.clear()


@signed_in
async def listen(request: web.Request) -> web.Response:
    """POST /console/api/calls/{call_id}/listen {sdp, type: "offer"} -> the answer (receive-only
    for the browser: the server only sends)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    from telephony.webrtc.offer import drop_mdns_candidates

    rt = request.app["runtime"]
    hub: ListenHub = request.app["console_listen"]
    who = request["console_session"].who
    call_id = request.match_info["call_id"]
    sess = next((s for s in (rt.scheduler.active_calls if rt.scheduler else []) if s.call_id == call_id), None)
    if sess is None:
        return web.json_response({"error": "not_found", "reason": "no call in progress has this id"}, status=404)
    try:
        body = await request.json()
        offer = RTCSessionDescription(sdp=drop_mdns_candidates(str(body["sdp"])).sdp, type="offer")
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "bad_offer", "reason": "send {sdp, type: offer}"}, status=400)
    mix = MixTrack()
    pc = RTCPeerConnection()
    pc.addTrack(mix.track)

    @pc.on("connectionstatechange")
    async def _state() -> None:
        if pc.connectionState in ("failed", "closed"):
            hub.remove(call_id, mix, pc)
            await pc.close()

    try:
        await pc.setRemoteDescription(offer)
        for t in pc.getTransceivers():
            t.direction = "sendonly"  # never receive: the supervisor's microphone goes nowhere
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as exc:
        await pc.close()
        sess.log.warning("console_listen_bad_offer", error=type(exc).__name__)
        return web.json_response({"error": "bad_offer", "reason": "cannot negotiate this offer"}, status=400)
    hub.add(call_id, mix, pc)
    sess.log.info("console_listen", by=who, listeners=hub.listeners(call_id))
    return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})


def add_routes(app: web.Application, prefix: str) -> None:
    app.router.add_post(prefix + "/api/calls/{call_id}/listen", listen)
