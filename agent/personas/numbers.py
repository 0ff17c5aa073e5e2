"""Dialled-number normalisation: `+1 (415) 555-0100`, `tel:+1-415-555-0100` and
`sip:+14155550100@host;user=phone` all become `+14155550100`; extensions stay digits."""

from __future__ import annotations

import re

_URI = re.compile(r"^(?:sips?|tel):", re.IGNORECASE)
_SEPARATORS = re.compile(r"[\s\-.()/]")
_VALID = re.compile(r"^\+?[0-9]{1,20}$")


def normalize_number(raw: str) -> str:
    """Canonical form of a dialled number; raises ValueError when it is not a number."""
    s = str(raw).strip()
    if _URI.match(s):
        s = _URI.sub("", s)
        s = s.split("@", 1)[0]
        s = s.split(";", 1)[0].split("?", 1)[0]
    s = _SEPARATORS.sub("", s)
    if s.startswith("00") and len(s) > 6:  # international prefix written as 00
        s = "+" + s[2:]
    if not _VALID.match(s):
        raise ValueError(f"{raw!r} is not a phone number or extension (digits, optional leading +)")
    return s


def lookup_keys(number: str) -> list[str]:
    """Keys to try, most specific first: as dialled, then with/without the leading '+'."""
    keys = [number]
    keys.append(number[1:] if number.startswith("+") else "+" + number)
    return keys
