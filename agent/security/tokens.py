"""Signed browser-call tokens: a company's backend decides who may call and what the agent knows.

The backend (or `personaplex-agent token mint`) signs a short-lived JWT (HS256, PyJWT) with a
secret it shares with the agent:
    persona  persona id or number the call may go to (required)
    exp      expiry (required; at most `webrtc.tokens.max_ttl_s` after `iat`/now)
    jti      single use: a token is accepted once (replay -> refused)
    context  per-call variables, trusted: they reach the prompt like a CRM's
A refusal says which check failed. Used `jti`s are remembered until their token expires, in this
process: behind a load balancer a token can be used once per agent (share a store to close it).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

import jwt

ALGORITHM = "HS256"


class TokenRejected(Exception):
    """`reason` is what the caller is told: missing, bad_signature, expired, reused, persona_not_allowed,
    invalid (malformed or lacking a claim), ttl_too_long."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class CallGrant:
    persona: str
    context: dict
    jti: str
    expires: float


@dataclass
class TokenVerifier:
    secret: str
    max_ttl_s: int = 300
    leeway_s: int = 5
    _used: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def verify(self, token: str | None, persona: str | None, matches=None) -> CallGrant:
        """The grant a token carries, checked; `persona`: what the caller asks for (None: the
        token's); `matches(asked, granted)`: whether a request for `asked` is one `granted`
        allows (numbers and ids route to the same persona)."""
        if not token:
            raise TokenRejected("missing", "this agent takes browser calls with a signed token only")
        try:
            claims = jwt.decode(token, self.secret, algorithms=[ALGORITHM], leeway=self.leeway_s,
                                options={"require": ["exp", "jti", "persona"]})
        except jwt.ExpiredSignatureError:
            raise TokenRejected("expired", "the call token has expired") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("bad_signature", "the call token's signature is not valid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected("invalid", f"the call token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise TokenRejected("invalid", f"the call token is not valid ({type(exc).__name__})") from None
        now = time.time()
        start = float(claims.get("iat", now))
        if float(claims["exp"]) - min(start, now) > self.max_ttl_s + self.leeway_s:
            raise TokenRejected("ttl_too_long", f"call tokens may live at most {self.max_ttl_s} s")
        granted = str(claims["persona"])
        if persona and persona != granted and not (matches and matches(persona, granted)):
            raise TokenRejected("persona_not_allowed", f"the call token is not for {persona!r}")
        context = claims.get("context") or {}
        if not isinstance(context, dict):
            raise TokenRejected("invalid", "the call token's context must be an object")
        jti = str(claims["jti"])
        with self._lock:
            self._used = {k: v for k, v in self._used.items() if v > now}  # forget expired ones
            if jti in self._used:
                raise TokenRejected("reused", "the call token was already used")
            self._used[jti] = float(claims["exp"]) + self.leeway_s
        return CallGrant(granted, context, jti, float(claims["exp"]))


def mint(secret: str, persona: str, ttl_s: int, context: dict | None = None, now: float | None = None) -> str:
    """A call token (what a company's backend would sign)."""
    now = time.time() if now is None else now
    claims = {"persona": persona, "iat": int(now), "exp": int(now + ttl_s), "jti": secrets.token_urlsafe(16)}
    if context:
        claims["context"] = dict(context)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
