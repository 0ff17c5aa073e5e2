"""The agent's outbound WebRTC track (telephony/webrtc/tracks.py): Opus encoded by the track
when the answer says Opus, frames for aiortc otherwise; answers made by a real aiortc peer."""

from __future__ import annotations

import asyncio
from fractions import Fraction

import av
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack

from telephony.webrtc.tracks import PACKET, RATE, AgentAudioTrack, answered_audio_codec


class Tone:
    """A playout (`next_packet`) of a 440 Hz tone, `packet` samples at a time."""

    def __init__(self, packet: int = PACKET):
        self.n, self.packet = 0, packet

    def next_packet(self) -> np.ndarray:
        t = (self.n * self.packet + np.arange(self.packet)) / RATE
        self.n += 1
        return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


async def _answer(offer_codecs: list[str] | None) -> str:
    """The answer our side's aiortc peer gives to an offer of these audio codecs (None: all)."""
    caller, agent = RTCPeerConnection(), RTCPeerConnection()
    try:
        tr = caller.addTransceiver(AudioStreamTrack(), direction="sendrecv")
        if offer_codecs is not None:
            caps = RTCRtpSender.getCapabilities("audio").codecs
            tr.setCodecPreferences([c for c in caps if c.mimeType.lower() in offer_codecs])
        await caller.setLocalDescription(await caller.createOffer())
        agent.addTrack(AgentAudioTrack(Tone()))  # type: ignore[arg-type]
        await agent.setRemoteDescription(caller.localDescription)
        await agent.setLocalDescription(await agent.createAnswer())
        return agent.localDescription.sdp
    finally:
        await caller.close()
        await agent.close()


def test_the_answers_codec_is_read_from_the_answer():
    assert answered_audio_codec(asyncio.run(_answer(None))) == "audio/opus"  # what browsers offer first
    assert answered_audio_codec(asyncio.run(_answer(["audio/pcmu"]))) == "audio/pcmu"
    assert answered_audio_codec("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n") is None


def test_opus_packets_decode_to_the_agents_audio_with_the_pacers_timestamps():
    track = AgentAudioTrack(Tone())  # type: ignore[arg-type]
    track.sends("audio/opus")

    async def take(n):
        return [await track.recv() for _ in range(n)]
    track._pacer.period_s = 0.0  # no real-time wait in a unit test
    packets = asyncio.run(take(25))
    assert all(isinstance(p, av.Packet) for p in packets)
    assert [p.pts for p in packets] == [i * PACKET for i in range(25)]  # RTP timestamps follow the pacer
    assert all(p.time_base == Fraction(1, RATE) for p in packets)
    decoder = av.CodecContext.create("opus", "r")
    frames = [f for p in packets for f in decoder.decode(p)]
    assert all(f.format.name == "fltp" for f in frames)  # planar float: the first channel is row 0
    decoded = np.concatenate([f.to_ndarray()[0] for f in frames])
    assert len(decoded) == 25 * PACKET
    tail = decoded[10 * PACKET:]  # past the codec's start-up
    spectrum = np.abs(np.fft.rfft(tail))
    assert abs(np.argmax(spectrum) * RATE / len(tail) - 440) < 10  # the agent's tone
    assert 0.15 < np.sqrt(np.mean(tail ** 2)) < 0.3  # at its level (0.3 peak: 0.21 rms)
    assert sum(p.size for p in packets) * 8 / (25 * PACKET / RATE) < 70000  # mono, about 48 kb/s


def test_other_codecs_get_frames_for_aiortc_to_encode():
    track = AgentAudioTrack(Tone())  # type: ignore[arg-type]
    track.sends("audio/pcmu")
    track._pacer.period_s = 0.0
    frame = asyncio.run(track.recv())
    assert isinstance(frame, av.AudioFrame) and frame.samples == PACKET and frame.sample_rate == RATE
    track.sends(None)
    assert isinstance(asyncio.run(track.recv()), av.AudioFrame)


def test_our_packet_length_follows_what_the_offer_asks_for():
    from telephony.webrtc.tracks import packet_for_offer

    def offer(*attrs: str) -> str:
        return ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
                + "".join(a + "\r\n" for a in attrs)
                + "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=ptime:5\r\n")

    assert packet_for_offer(offer()) == PACKET == RATE * 40 // 1000  # browsers ask nothing: 40 ms
    assert packet_for_offer(offer("a=maxptime:120")) == PACKET  # Firefox's offer
    assert packet_for_offer(offer("a=ptime:20")) == RATE * 20 // 1000  # what it wants to receive
    assert packet_for_offer(offer("a=maxptime:30")) == RATE * 20 // 1000  # the longest it takes
    assert packet_for_offer(offer("a=ptime:60", "a=maxptime:60")) == RATE * 60 // 1000
    assert packet_for_offer(offer("a=ptime:5")) == RATE * 10 // 1000  # Opus's shortest we send
    # (the data section's a=ptime:5 is not the audio's)


def test_a_20_ms_track_sends_20_ms_opus_packets():
    track = AgentAudioTrack(Tone(960), 960)  # type: ignore[arg-type]
    track.sends("audio/opus")
    track._pacer.period_s = 0.0
    packets = asyncio.run(_take(track, 5))
    assert [p.pts for p in packets] == [i * 960 for i in range(5)]
    decoder = av.CodecContext.create("opus", "r")
    assert all(f.samples == 960 for p in packets for f in decoder.decode(p))


async def _take(track, n):
    return [await track.recv() for _ in range(n)]
