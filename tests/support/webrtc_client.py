"""A Python WebRTC caller (aiortc) for tests and benchmarks: plays a wav, records the agent."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer


#: RMS (full scale 1.0) above which a received frame counts as sound: -60 dBFS, far above Opus'
#: decoded digital silence and far below the demo agent's noise.
LOUD_RMS = 1e-3


class WebRtcCaller:
    def __init__(self, base_url: str, persona: str, wav: str | None = None, extra: dict | None = None,
                 headers: dict | None = None):
        """`extra`: more fields of the /api/call body (context, playground); `headers`: of that request."""
        self.base_url, self.persona, self.wav = base_url, persona, wav
        self.extra, self.headers = dict(extra or {}), dict(headers or {})
        self.pc = RTCPeerConnection()
        self.events: list[dict] = []
        self.received: list[np.ndarray] = []
        self.status: int | None = None
        self.body: dict = {}
        self.channel = None
        self._rx_task = None
        self.player = None

    async def call(self) -> int:
        if self.wav:
            self.player = MediaPlayer(self.wav)
            self.pc.addTrack(self.player.audio)
        else:
            self.pc.addTransceiver("audio", direction="recvonly")
        self.channel = self.pc.createDataChannel("events")
        self.channel.on("message", lambda m: self.events.append(json.loads(m)))
        self.pc.on("track", self._on_track)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with aiohttp.ClientSession() as http:
            async with http.post(self.base_url + "/api/call", headers=self.headers, json={
                    "sdp": self.pc.localDescription.sdp, "type": "offer", "persona": self.persona,
                    **self.extra}) as r:
                self.status = r.status
                self.body = await r.json()
        if self.status != 200:
            await self.pc.close()
            return self.status
        await self.pc.setRemoteDescription(RTCSessionDescription(self.body["sdp"], self.body["type"]))
        return self.status

    def _on_track(self, track) -> None:
        async def rx():
            try:
                while True:
                    f = await track.recv()
                    # packed s16, channels interleaved (aiortc's Opus decoder gives stereo): as mono
                    pcm = f.to_ndarray().reshape(-1, len(f.layout.channels)).mean(axis=1)
                    self.received.append(pcm.astype(np.float32) / 32768.0)
            except Exception:
                pass
        self._rx_task = asyncio.ensure_future(rx())

    def loud(self, since: int = 0, floor: float = LOUD_RMS) -> int:
        """How many of the 20 ms frames received from index `since` on carry sound (RMS above
        `floor`). The track sends a frame every 20 ms whether the agent speaks or not, so "the
        call goes on" is this count growing, not the number of frames received."""
        return sum(1 for f in self.received[since:] if f.size and float(np.sqrt(np.mean(f * f))) > floor)

    def kinds(self) -> list[str]:
        return [e.get("type") for e in self.events]

    async def hangup(self, timeout: float = 5.0) -> None:
        """Hang up from the page's side; close once the server has said the call ended (its
        last message) or `timeout` passed, so the server's end of the call is not raced."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # a call hung up right after its answer is still connecting: wait for the channel, or
        # the server only learns the page went when its connect timeout (20 s) runs out
        while (self.status == 200 and self.channel is not None and self.channel.readyState == "connecting"
               and loop.time() < deadline):
            await asyncio.sleep(0.02)
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(json.dumps({"type": "hangup"}))
            while "ended" not in self.kinds() and loop.time() < deadline:
                await asyncio.sleep(0.02)
        await self.close()

    async def close(self) -> None:
        if self.player is not None and self.player.audio is not None:
            self.player.audio.stop()
        await self.pc.close()
        if self._rx_task is not None:
            self._rx_task.cancel()
