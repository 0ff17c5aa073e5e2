"""Offers whose host candidates are mDNS names (telephony/webrtc/offer.py), with real aiortc peers."""

from __future__ import annotations

import asyncio
import re

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack

from telephony.webrtc.offer import drop_mdns_candidates

MDNS = "f5bafd2a-b709-45d5-949d-89ba14c70bc3.local"


def hide_host_addresses(sdp: str) -> str:
    """What a browser sends when it obfuscates its addresses: every host candidate an mDNS name."""
    return re.sub(r"(a=candidate:\S+ \d+ \S+ \d+ )(\S+)", rf"\g<1>{MDNS}", sdp)


def test_plain_offers_pass_unchanged():
    sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=candidate:1 1 udp 2130706431 10.0.0.5 50000 typ host\r\n" \
          "a=end-of-candidates\r\n"
    clean = drop_mdns_candidates(sdp)
    assert clean.sdp == sdp and clean.mdns_dropped == 0


def test_mdns_candidates_and_end_marker_dropped():
    sdp = ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
           f"a=candidate:0 1 UDP 2122187007 {MDNS} 49159 typ host\r\n"
           f"a=candidate:2 1 TCP 2105458943 {MDNS} 9 typ host tcptype active\r\n"
           "a=candidate:3 1 UDP 1686052607 203.0.113.7 49159 typ srflx raddr 0.0.0.0 rport 0\r\n"
           "a=end-of-candidates\r\n")
    clean = drop_mdns_candidates(sdp)
    assert clean.mdns_dropped == 2
    assert ".local" not in clean.sdp and "end-of-candidates" not in clean.sdp
    assert "203.0.113.7" in clean.sdp  # other candidates are kept


async def _connect(clean: bool) -> tuple[str, str]:
    caller, agent = RTCPeerConnection(), RTCPeerConnection()
    caller.addTrack(AudioStreamTrack())
    agent.addTrack(AudioStreamTrack())
    try:
        await caller.setLocalDescription(await caller.createOffer())
        sdp = hide_host_addresses(caller.localDescription.sdp)
        if clean:
            sdp = drop_mdns_candidates(sdp).sdp
        await agent.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        await agent.setLocalDescription(await agent.createAnswer())
        answer = agent.localDescription.sdp
        if "a=candidate:" not in answer:
            return agent.connectionState, answer  # nothing to connect to: no point in waiting
        await caller.setRemoteDescription(agent.localDescription)
        for _ in range(100):  # bounded: 10 s at most
            if agent.connectionState in ("connected", "failed"):
                break
            await asyncio.sleep(0.1)
        return agent.connectionState, answer
    finally:
        await caller.close()
        await agent.close()


def test_agent_connects_to_a_caller_hidden_behind_mdns():
    # As received, the offer leaves aiortc without a single candidate of its own to answer with
    # (unresolvable names, then end-of-candidates): the call could never connect.
    state, answer = asyncio.run(_connect(clean=False))
    assert "a=candidate:" not in answer and state != "connected"
    # Cleaned, the agent answers with its candidates and learns the caller's address from the
    # caller's own connectivity checks (peer-reflexive).
    state, answer = asyncio.run(_connect(clean=True))
    assert "a=candidate:" in answer and state == "connected"


def test_the_answer_asks_for_the_configured_packet_length_in_its_audio_section_only():
    from telephony.webrtc.offer import ask_for_ptime

    sdp = ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
           "m=audio 9 UDP/TLS/RTP/SAVPF 111 0\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:111 opus/48000/2\r\n"
           "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=sctp-port:5000\r\n")
    asked = ask_for_ptime(sdp, 40)
    sections = asked.split("m=")
    assert "a=ptime:40\r\n" in sections[1] and "ptime" not in sections[2] and "ptime" not in sections[0]
    assert asked.replace("a=ptime:40\r\n", "") == sdp  # nothing else changed
    assert ask_for_ptime(asked, 20) == asked  # a section that says its ptime keeps it


def test_a_real_answer_with_ptime_is_still_accepted_by_a_peer():
    """aiortc (as a browser would) takes our answer with the packet length asked for."""
    from telephony.webrtc.offer import ask_for_ptime

    async def run():
        caller, agent = RTCPeerConnection(), RTCPeerConnection()
        try:
            caller.addTrack(AudioStreamTrack())
            agent.addTrack(AudioStreamTrack())
            await caller.setLocalDescription(await caller.createOffer())
            await agent.setRemoteDescription(caller.localDescription)
            await agent.setLocalDescription(await agent.createAnswer())
            answer = ask_for_ptime(agent.localDescription.sdp, 40)
            await caller.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            return answer
        finally:
            await caller.close()
            await agent.close()
    assert "a=ptime:40" in asyncio.run(run())


def test_lost_packets_are_counted_at_the_length_the_caller_sends():
    from telephony.webrtc.transport import CallerPackets

    p = CallerPackets()
    assert p.seconds == 0.020  # until a second of packets was seen
    p.observe(10.0, 0)
    p.observe(10.5, 12)  # the first packets: the clock starts here
    p.observe(11.0, 24)
    assert p.seconds == 0.020
    p.observe(11.5, 37)  # 25 packets in 1 s: a browser that took the answer's 40 ms
    assert abs(p.seconds - 0.040) < 1e-9
    p.observe(12.5, 37)  # nothing arrived, nothing counted lost (a stall): the estimate stays bounded
    assert 0.010 <= p.seconds <= 0.120
