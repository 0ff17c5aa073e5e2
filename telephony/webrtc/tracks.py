"""The agent's voice as an aiortc audio track: 40 ms packets at 48 kHz, paced in real time.

When the answer says Opus (every browser offers it first), the track hands aiortc Opus packets
it encoded itself, mono, instead of PCM frames. aiortc takes either (`RTCRtpSender` packs an
`av.Packet` as it is); for a frame it measures the audio level with numpy and sends it through
the event loop's thread pool to a stereo encoder, a thread hop per packet that was most of a
WebRTC call's send path. Any other codec (G.711 from a client that offers only that) gets
frames, encoded by aiortc as before.
"""

from __future__ import annotations

import fractions

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from telephony.audio.codecs import float_to_int16
from telephony.audio.edge import Playout
from telephony.audio.pacer import Pacer
from telephony.webrtc.offer import audio_attribute

RATE = 48000
PACKET = 1920  # 40 ms: half the RTP packets of 20 ms (aiortc's send path is Python per packet)
PACKET_MS_CHOICES = (10, 20, 40, 60)  # lengths both Opus and G.711 packets come in


def packet_for_offer(sdp: str) -> int:
    """Our packets' length for this caller (samples at RATE): PACKET unless the offer's audio
    section asks otherwise (RFC 4566: `a=ptime`, the length it wants to receive; `a=maxptime`,
    the longest it takes), then the nearest allowed length at or under what it asks."""
    want = 1000 * PACKET // RATE
    for attr in ("ptime", "maxptime"):
        asked = audio_attribute(sdp, attr)
        if asked is not None and asked.isdigit() and (attr == "ptime" or int(asked) < want):
            want = max([m for m in PACKET_MS_CHOICES if m <= int(asked)] or [PACKET_MS_CHOICES[0]])
    return RATE * want // 1000
TIME_BASE = fractions.Fraction(1, RATE)
OPUS_BITRATE = 48000  # mono speech, fullband: well above what a voice needs, a third of aiortc's 96 kb/s stereo


def answered_audio_codec(sdp: str) -> str | None:
    """The codec our answer sends audio with (aiortc's sender takes the first one negotiated),
    as a lower-case MIME type ("audio/opus"), or None without an audio section."""
    for media in SessionDescription.parse(sdp).media:
        if media.kind == "audio" and media.rtp.codecs:
            return media.rtp.codecs[0].mimeType.lower()
    return None


class OpusPackets:
    """Mono Opus packets of `samples` samples at RATE, stamped with the track's own timestamps."""

    def __init__(self, samples: int = PACKET) -> None:
        c = av.CodecContext.create("libopus", "w")
        c.bit_rate = OPUS_BITRATE
        c.format = "s16"
        c.layout = "mono"
        c.sample_rate = RATE
        c.time_base = TIME_BASE
        c.options = {"application": "voip", "frame_duration": str(1000 * samples // RATE)}
        self.codec = c

    def encode(self, frame: av.AudioFrame) -> av.Packet | None:
        """The frame's packet (None if the encoder held it back: libopus never has, a frame of
        its frame size in gives one packet out, its look-ahead showing only as a pts 312
        samples early). Stamped with the frame's own time, so RTP timestamps follow the pacer."""
        packets = self.codec.encode(frame)
        if not packets:
            return None
        packet = packets[0]
        packet.pts = frame.pts
        packet.time_base = TIME_BASE
        return packet


class AgentAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, playout: Playout, packet: int = PACKET):
        """`packet`: samples at RATE per packet (`packet_for_offer`); `playout` hands out as many."""
        super().__init__()
        self.playout = playout
        self.packet = packet
        self._pacer = Pacer(packet / RATE)
        self._opus: OpusPackets | None = None

    def sends(self, codec: str | None) -> None:
        """The negotiated codec (`answered_audio_codec`): Opus is encoded here, anything else by
        aiortc."""
        self._opus = OpusPackets(self.packet) if codec == "audio/opus" else None

    def media(self, codec: str | None) -> dict:
        """What this track sends, for the `webrtc_media` log line."""
        return {"codec": codec, "packet_ms": 1000 * self.packet // RATE,
                "encoder": "agent" if self._opus is not None else "aiortc"}

    async def next_pcm(self) -> tuple[int, np.ndarray]:
        """The next packet's timestamp and agent audio (float32 at RATE), at its time."""
        pts = await self._pacer.wait() * self.packet  # continuous through a stall (re-anchored, no burst)
        return pts, self.playout.next_packet()

    async def recv(self) -> av.AudioFrame | av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        pts, pcm = await self.next_pcm()
        frame = av.AudioFrame.from_ndarray(float_to_int16(pcm)[None, :], format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = pts
        frame.time_base = TIME_BASE
        packet = self._opus.encode(frame) if self._opus is not None else None
        return frame if packet is None else packet
