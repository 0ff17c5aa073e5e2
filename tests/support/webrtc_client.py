"""A Python WebRTC caller (aiortc) for tests and benchmarks: plays a wav, records the agent."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamError

from telephony.audio.codecs import float_to_int16
from telephony.audio.pacer import Pacer
from telephony.webrtc.offer import audio_attribute
from telephony.webrtc.tracks import RATE, TIME_BASE, OpusPackets


#: RMS (full scale 1.0) above which a received frame counts as sound: -60 dBFS, far above Opus'
#: decoded digital silence and far below the demo agent's noise.
LOUD_RMS = 1e-3


class AnsweredPtimeTrack(MediaStreamTrack):
    """A wav sent as a browser sends its microphone: Opus in packets of the length the answer
    asks for (`a=ptime`; 20 ms, Opus's default, when it asks nothing), where aiortc's own
    sender always sends 20 ms."""

    kind = "audio"

    def __init__(self, wav: str):
        super().__init__()
        from agent.audio_io import read_audio

        self.pcm = read_audio(wav, RATE)
        self.ptime_ms = 20  # until the answer says
        self._opus: OpusPackets | None = None
        self._pacer: Pacer | None = None
        self._pos = 0

    async def recv(self) -> av.Packet:
        if self._opus is None:  # the first packet goes after the answer: its ptime is known
            self._n = RATE * self.ptime_ms // 1000
            self._opus, self._pacer = OpusPackets(self._n), Pacer(self._n / RATE)
        if self.readyState != "live" or self._pos + self._n > len(self.pcm):
            self.stop()
            raise MediaStreamError
        pts = await self._pacer.wait() * self._n
        chunk, self._pos = self.pcm[self._pos:self._pos + self._n], self._pos + self._n
        frame = av.AudioFrame.from_ndarray(float_to_int16(chunk)[None, :], format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, pts, TIME_BASE
        packet = self._opus.encode(frame)
        assert packet is not None
        return packet


class WebRtcCaller:
    def __init__(self, base_url: str, persona: str, wav: str | None = None, extra: dict | None = None,
                 headers: dict | None = None, as_browser: bool = False):
        """`extra`: more fields of the /api/call body (context, playground); `headers`: of that
        request; `as_browser`: send the wav in the packet length the answer asks for."""
        self.as_browser = as_browser
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
        self.source: AnsweredPtimeTrack | None = None

    async def call(self) -> int:
        if self.wav and self.as_browser:
            self.source = AnsweredPtimeTrack(self.wav)
            self.pc.addTrack(self.source)
        elif self.wav:
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
        if self.source is not None:
            asked = audio_attribute(self.body["sdp"], "ptime")
            self.source.ptime_ms = int(asked) if asked and asked.isdigit() else 20
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
        """How many of the frames received (one per packet: 40 ms from this server) from index
        `since` on carry sound (RMS above `floor`). The track sends a packet every 40 ms whether
        the agent speaks or not, so "the call goes on" is this count growing, not the number of
        frames received."""
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
        if self.source is not None:
            self.source.stop()
        await self.pc.close()
        if self._rx_task is not None:
            self._rx_task.cancel()
