"""Signed browser-call tokens: a company's backend decides who may call and what the agent knows.

The backend (or `personaplex-agent token mint`) signs a short-lived JWT (HS256, PyJWT) with a
secret it shares with the agent:
    persona  persona id or number the call may go to (required)
    exp      expiry (required; at most `webrtc.tokens.max_ttl_s` after `iat`/now)
    jti      single use: a token is accepted once (replay -> refused)
    aud      required to name `webrtc.tokens.audience` when that is set
    context  per-call variables, trusted: they reach the prompt like a CRM's
A refusal says which check failed. Checking is two steps: `check` (signature and claims: cheap,
nothing remembered) and `claim` (single use, through a `ReplayStore`: this process's memory, or
Redis shared by a farm), so a request refused between them (a client over its limits) does not
burn its token.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import jwt

from telephony.security.replay import LocalReplayStore, ReplayStore, ReplayStoreUnavailable

ALGORITHM = "HS256"


# What the page tells the person calling, per reason (the page shows these; `detail` is for the
# company's developers).
CALLER_MESSAGES = {
    "missing": "this agent needs a call link from the company's website",
    "expired": "the call link has expired, get a new one",
    "reused": "the call link was already used",
    "bad_signature": "the call link is not valid",
    "persona_not_allowed": "the call link is for another line",
    "invalid": "the call link is not valid",
    "ttl_too_long": "the call link is not valid",
    "wrong_audience": "the call link is for another agent",
    "store_unavailable": "calls cannot be checked right now, try again in a minute",
}


class TokenRejected(Exception):
    """`reason` is what the caller is told: missing, bad_signature, expired, reused, persona_not_allowed,
    invalid (malformed or lacking a claim), ttl_too_long, wrong_audience, store_unavailable (the
    shared replay store did not answer: refused, since a replay cannot be ruled out)."""

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
    audience: str | None = None
    store: ReplayStore = field(default_factory=LocalReplayStore)

    def check(self, token: str | None, persona: str | None, matches=None) -> CallGrant:
        """The grant a token carries, its signature and claims checked (not yet used: `claim`).
        `persona`: what the caller asks for (None: the token's); `matches(asked, granted)`:
        whether a request for `asked` is one `granted` allows (numbers and ids route to the same
        persona)."""
        if not token:
            raise TokenRejected("missing", "this agent takes browser calls with a signed token only")
        required = ["exp", "jti", "persona"] + (["aud"] if self.audience else [])
        try:
            claims = jwt.decode(token, self.secret, algorithms=[ALGORITHM], leeway=self.leeway_s,
                                audience=self.audience, options={"require": required,
                                                                 "verify_aud": self.audience is not None})
        except jwt.ExpiredSignatureError:
            raise TokenRejected("expired", "the call token has expired") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("bad_signature", "the call token's signature is not valid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected("invalid", f"the call token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("wrong_audience", "the call token is not for this agent (aud)") from None
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
        return CallGrant(granted, context, str(claims["jti"]), float(claims["exp"]))

    def claim(self, grant: CallGrant) -> None:
        """Use the token up (single use, across the farm when the store is shared)."""
        try:
            fresh = self.store.claim(grant.jti, grant.expires + self.leeway_s)
        except ReplayStoreUnavailable as exc:
            raise TokenRejected("store_unavailable", f"cannot check the call token's single use: {exc}") from None
        if not fresh:
            raise TokenRejected("reused", "the call token was already used")

    def verify(self, token: str | None, persona: str | None, matches=None) -> CallGrant:
        """`check` then `claim`."""
        grant = self.check(token, persona, matches)
        self.claim(grant)
        return grant


def mint(secret: str, persona: str, ttl_s: int, context: dict | None = None, now: float | None = None,
         audience: str | None = None) -> str:
    """A call token (what a company's backend would sign)."""
    now = time.time() if now is None else now
    claims = {"persona": persona, "iat": int(now), "exp": int(now + ttl_s), "jti": secrets.token_urlsafe(16)}
    if audience:
        claims["aud"] = audience
    if context:
        claims["context"] = dict(context)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
