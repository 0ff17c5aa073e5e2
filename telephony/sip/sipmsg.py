"""Reading what pjsua2 hands us of an incoming INVITE: dialled and calling numbers, headers, source address."""

from __future__ import annotations

import ipaddress
import re

_REQ_LINE = re.compile(r"^INVITE\s+(\S+)\s+SIP/2\.0", re.IGNORECASE)
_TO = re.compile(r"^(?:To|t)\s*:\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_FROM = re.compile(r"^(?:From|f)\s*:\s*(.+)$", re.IGNORECASE | re.MULTILINE)
_URI_USER = re.compile(r"(?:sips?:([^@;>\s]+)@|tel:([^;>\s]+))", re.IGNORECASE)


def dialled_user(whole_msg: str) -> str | None:
    """The Request-URI's user part, falling back to the To header's."""
    first = whole_msg.lstrip().split("\r\n", 1)[0].split("\n", 1)[0]
    m = _REQ_LINE.match(first)
    if m:
        u = _URI_USER.search(m.group(1))
        if u:
            return u.group(1) or u.group(2)
    t = _TO.search(whole_msg)
    if t:
        u = _URI_USER.search(t.group(1))
        if u:
            return u.group(1) or u.group(2)
    return None


def caller_user(whole_msg: str) -> str | None:
    """The From header's user part (the caller's number), if it has one."""
    f = _FROM.search(whole_msg)
    if f:
        u = _URI_USER.search(f.group(1))
        if u:
            return u.group(1) or u.group(2)
    return None


def has_header(whole_msg: str, name: str) -> bool:
    """Whether the message's header section has a `name` header (any case; a folded line is
    no header of its own)."""
    head = whole_msg.split("\r\n\r\n", 1)[0].split("\n\n", 1)[0]
    wanted = name.lower()
    for line in head.splitlines()[1:]:
        if line[:1] in (" ", "\t"):
            continue
        header, sep, _ = line.partition(":")
        if sep and header.strip().lower() == wanted:
            return True
    return False


def source_ip(src_address: str) -> str:
    """'127.0.0.1:5062' or '[::1]:5062' -> the address."""
    s = src_address.strip()
    if s.startswith("["):
        return s[1:].split("]", 1)[0]
    return s.rsplit(":", 1)[0] if s.count(":") == 1 else s


def allowed(ip: str, networks: list[str]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(n, strict=False) for n in networks)


def header_variables(whole_msg: str, mapping: dict[str, str]) -> dict[str, str]:
    """Per-call variables from INVITE headers: {header name (any case): variable name}. The
    first occurrence of a header wins; values are cleaned later (agent.calls.context)."""
    if not mapping:
        return {}
    wanted = {h.lower(): var for h, var in mapping.items()}
    out: dict[str, str] = {}
    head = whole_msg.split("\r\n\r\n", 1)[0].split("\n\n", 1)[0]
    for line in head.splitlines()[1:]:
        name, sep, value = line.partition(":")
        var = wanted.get(name.strip().lower()) if sep else None
        if var is not None and var not in out:
            out[var] = value.strip()
    return out
