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
