"""The ops API of a running server, as a campaign uses it: place a call (`POST /api/calls`),
and follow it (`GET /api/calls/{id}`). Answers become small values the
scheduler decides on; only what no row can get past (a wrong token, an unknown persona) raises."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from agent.errors import AgentError

#: seconds one request may take before it counts as failed
REQUEST_TIMEOUT_S = 10.0


class CampaignAborted(AgentError):
    """A refusal that holds for every row (401, unknown persona): the campaign stops."""


@dataclass(frozen=True)
class Dial:
    """What a POST came to. `kind`: placed (call_id set), capacity (503: no slot; not an
    attempt), unreachable (no connection: nothing was placed), rejected (400: the row's body),
    not_allowed (403: number or caller id not allowed), error (an answer that may or may not have
    placed a call: a timeout, a 5xx)."""

    kind: str
    call_id: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class CallStatus:
    """A call as GET shows it (`state` None: the server does not know the id)."""

    state: str | None
    answered_at: float | None = None
    ended_at: float | None = None
    reason: str | None = None
    amd: str | None = None  # the server's answering-machine verdict: human, machine, unknown
    unreachable: bool = False


def _epoch(value) -> float | None:
    """The contract's times: epoch seconds, or ISO 8601 strings."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class OpsClient:
    """One aiohttp session to `base_url`, with the bearer token when one is given."""

    def __init__(self, base_url: str, token: str | None, token_env: str = "PERSONAPLEX_OPS_TOKEN"):
        self.base = base_url.rstrip("/")
        self._token_given, self._token_env = bool(token), token_env
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))

    async def close(self) -> None:
        await self._http.close()

    @staticmethod
    async def _body(r: aiohttp.ClientResponse) -> dict:
        try:
            body = await r.json(content_type=None)
        except (ValueError, aiohttp.ContentTypeError):
            return {}
        return body if isinstance(body, dict) else {}

    def _abort_on(self, status: int, body: dict, what: str) -> None:
        if status == 401 and not self._token_given:
            raise CampaignAborted(f"the ops API at {self.base} needs its token ({what} got 401): set "
                                  f"${self._token_env} (or name its variable with --ops-token-env)")
        if status == 401:
            raise CampaignAborted(f"the ops API at {self.base} refused the token in ${self._token_env} "
                                  f"({what} got 401): give it the server's ops token")

    async def dial(self, to: str, persona: str, variables: dict[str, str], caller: str | None,
                   ring_timeout_s: float | None) -> Dial:
        body: dict = {"to": to, "persona": persona, "variables": variables}
        if caller:
            body["from"] = caller
        if ring_timeout_s is not None:
            body["ring_timeout_s"] = ring_timeout_s
        try:
            async with self._http.post(self.base + "/api/calls", json=body) as r:
                got = await self._body(r)
                self._abort_on(r.status, got, "POST /api/calls")
                if r.status in (200, 201, 202) and got.get("call_id"):
                    return Dial("placed", str(got["call_id"]))
                reason = str(got.get("reason") or "")
                if r.status == 503:
                    # a server with no free slot, or one draining: either way nothing was placed
                    return Dial("capacity", detail=reason or "unavailable")
                if r.status == 404:
                    raise CampaignAborted(f"the server cannot place calls as persona {persona!r} (404 from POST "
                                          f"/api/calls: {got.get('error') or 'no such persona'})")
                if r.status == 405:
                    raise CampaignAborted(f"the server at {self.base} does not place calls (405 from POST "
                                          "/api/calls): is outbound calling enabled in its config?")
                if r.status == 400:
                    return Dial("rejected", detail="HTTP 400")  # its sentence may quote the number: not logged
                if r.status == 403 and reason in ("disabled", "allowed_from"):
                    raise CampaignAborted(f"the server refuses every call of this campaign (403 from POST "
                                          f"/api/calls): {got.get('error') or reason}")
                if r.status == 403:
                    return Dial("not_allowed", detail=f"HTTP 403 {reason}".strip())
                return Dial("error", detail=f"HTTP {r.status} {reason}".strip())
        except aiohttp.ClientConnectorError as exc:
            return Dial("unreachable", detail=str(exc))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return Dial("error", detail=type(exc).__name__)

    async def status(self, call_id: str) -> CallStatus:
        try:
            async with self._http.get(f"{self.base}/api/calls/{call_id}") as r:
                got = await self._body(r)
                self._abort_on(r.status, got, "GET /api/calls/{id}")
                if r.status == 404:
                    return CallStatus(None)
                if r.status != 200:
                    return CallStatus(None, unreachable=True)
                return CallStatus(got.get("state"), _epoch(got.get("answered_at")), _epoch(got.get("ended_at")),
                                  got.get("reason"), got.get("amd"))
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return CallStatus(None, unreachable=True)
