"""The SDP we take from browsers and give back: offers whose host candidates are hidden behind
mDNS names, and answers that ask for a packet length (`ask_for_ptime`).

Browsers hide their local addresses behind random `<uuid>.local` names unless the page holds a
capture permission they count (Firefox's fake devices, some Chromium and Safari set-ups). The
server can only resolve those names by multicast DNS on the caller's own LAN, which a server in a
data centre or a container never is: aioice then spends a second per name failing to resolve it,
and, once end-of-candidates says there are no more, gives up on ICE and answers with no
candidates of its own, so the call can never connect.

It does not need them. The browser sends its connectivity checks to the server's candidates, and
the server learns the browser's address from those checks (a peer-reflexive candidate, RFC 8445
section 7.3.1.3). So we drop the mDNS candidates before aiortc sees the offer, and with them the
end-of-candidates marker, which keeps ICE waiting for the browser's checks instead of failing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class CleanOffer:
    sdp: str
    mdns_dropped: int  # how many mDNS host candidates were removed


def _is_mdns_candidate(line: str) -> bool:
    # a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ ...
    parts = line.split()
    return len(parts) > 4 and parts[4].lower().endswith(".local")


def drop_mdns_candidates(sdp: str) -> CleanOffer:
    """The offer without its mDNS candidates (and, if any were dropped, without
    end-of-candidates); an offer without mDNS candidates comes back unchanged."""
    lines = sdp.splitlines()
    kept = [ln for ln in lines if not (ln.startswith("a=candidate:") and _is_mdns_candidate(ln))]
    dropped = len(lines) - len(kept)
    if not dropped:
        return CleanOffer(sdp, 0)
    kept = [ln for ln in kept if ln.strip() != "a=end-of-candidates"]
    return CleanOffer("".join(ln + "\r\n" for ln in kept), dropped)


def ask_for_ptime(sdp: str, ms: int) -> str:
    """The answer with `a=ptime:<ms>` in each audio section that has none (RFC 4566: the packet
    length the answerer wants to receive). Chromium and Firefox then send Opus in packets of
    that length (checked: 40 ms -> 25 packets a second instead of 50); aiortc and other
    clients may ignore it, which costs nothing. Every packet in costs the server aiortc's
    Python per-packet path, so fewer packets carry more calls per process."""
    out: list[str] = []
    lines = sdp.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if not line.startswith("m=audio"):
            continue
        section = []
        while i < len(lines) and not lines[i].startswith("m="):
            section.append(lines[i])
            i += 1
        if not any(ln.startswith("a=ptime:") for ln in section):
            out.append(f"a=ptime:{ms}")
        out.extend(section)
    return "".join(ln + "\r\n" for ln in out)


def audio_attribute(sdp: str, name: str) -> str | None:
    """The value of `a=<name>:` in the SDP's audio section, or None."""
    section = re.search(r"^m=audio.*?(?=^m=|\Z)", sdp, re.M | re.S)
    found = section and re.search(rf"^a={re.escape(name)}:(\S+)", section.group(0), re.M)
    return found.group(1) if found else None
