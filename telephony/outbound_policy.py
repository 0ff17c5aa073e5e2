"""What an outbound call may dial and present: targets, caller IDs and the patterns that allow them.

A target (`to`, `from`) is a SIP URI (`sip:`/`sips:`) or a phone number (E.164 `+4930...` or
digits; spaces, dashes, dots and brackets are dropped). A pattern is one of the same two kinds:
a URI pattern where `*` stands for any text (`sip:*@pbx.example.com`), matched against URIs only,
case-insensitively; or a number prefix (`+4930`, `+1415555*`), matched against numbers only. A
lone `*` allows everything, and only when an operator writes it: nothing is allowed by default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_URI = re.compile(r"^sips?:[^\s<>\"]{1,250}$", re.I)
_NUMBER = re.compile(r"^\+?[0-9]{2,20}$")
_NUMBER_PATTERN = re.compile(r"^\+?[0-9]{1,20}\*?$")
_NUMBER_NOISE = re.compile(r"[\s().\-]")


class TargetError(ValueError):
    """Not a SIP URI and not a phone number (the message says which)."""


@dataclass(frozen=True)
class Target:
    text: str  # the URI, or the number without formatting
    is_uri: bool

    def dial_uri(self, trunk_host: str | None) -> str:
        """The Request-URI: a URI as it is; a number through the trunk (`sip.registration`)."""
        if self.is_uri:
            return self.text
        if trunk_host is None:
            raise TargetError("a number is dialled through sip.registration (the trunk), which is not set: "
                              "give a SIP URI")
        return f"sip:{self.text}@{trunk_host}"


def parse_target(text: str) -> Target:
    value = text.strip()
    if value.lower().startswith(("sip:", "sips:")):
        if not _URI.match(value):
            raise TargetError(f"{value!r} is not a SIP URI")
        return Target(value, True)
    number = _NUMBER_NOISE.sub("", value)
    if not _NUMBER.match(number):
        raise TargetError(f"{value!r} is neither a SIP URI (sip:...) nor a phone number (+4930...)")
    return Target(number, False)


def check_pattern(pattern: str) -> None:
    """Raise ValueError when `pattern` is neither kind (a config typo must not allow nothing silently)."""
    p = pattern.strip()
    if p == "*" or (p.lower().startswith(("sip:", "sips:")) and " " not in p):
        return
    if not _NUMBER_PATTERN.match(_NUMBER_NOISE.sub("", p)):
        raise ValueError(f"{pattern!r} is neither a number prefix (+4930, +1415555*) nor a SIP URI "
                         "pattern (sip:*@pbx.example.com)")


def _glob(pattern: str) -> re.Pattern:
    """`*` is any text; everything else is literal (no `?` or `[...]`: URIs contain them)."""
    return re.compile("^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$", re.I | re.S)


def allowed(target: Target, patterns: list[str]) -> bool:
    for raw in patterns:
        p = raw.strip()
        if p == "*":
            return True
        if p.lower().startswith(("sip:", "sips:")):
            if target.is_uri and _glob(p).match(target.text):
                return True
        elif not target.is_uri and target.text.startswith(_NUMBER_NOISE.sub("", p).rstrip("*")):
            return True
    return False
