"""Per-call context: what the agent should know about this caller, from every source, made safe.

Sources, later ones win:
1. what the transport carries: SIP headers mapped in `sip.context_headers`, the browser's
   `context` (only where trusted: `webrtc.client_context`, the playground, a signed token), a
   carrier stream's custom parameters;
2. a CRM lookup (`context.lookup_url`): POST {call_id, endpoint, dialled_number, caller_number,
   variables} -> a JSON object of variables, within `context.lookup_timeout_ms`;
3. the built-ins `caller_number`, `dialled_number`: what the transport itself says, always.
   Nothing carried can set them (a stranger naming a victim's number would otherwise get the
   victim's CRM record read out), and the lookup is keyed on the transport's own numbers.
The lookup follows no redirects, reads at most 64 KiB, and refuses to send its bearer token over
plain http:// to anything but this host.
A lookup that fails in any way (error, timeout, not JSON, not an object, over 64 KiB) leaves the
call with what is known: it is answered anyway, and the failure is logged and counted. The lookup
runs on the server's event loop (aiohttp), never on the engine, SIP or a blocking thread.

Values are personal data and untrusted text: each is a string of at most 200 characters with
control characters, newlines and angle brackets removed (nothing can write the prompt's
`<system>` markers or end the system block); logs name the variables, never their values.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import structlog

from agent.calls.events import CallState
from agent.metrics import Metrics
from agent.personas.templates import BUILTINS, NAME

log = structlog.get_logger(__name__)

MAX_VALUE_CHARS = 200
MAX_VARIABLES = 64
MAX_LOOKUP_BYTES = 64 * 1024
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f<>\u2028\u2029]")


def clean_value(value: Any) -> str | None:
    """A variable value made safe for the prompt, or None when it cannot be one (not text)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = " ".join(_UNSAFE.sub(" ", str(value)).split())
    return text[:MAX_VALUE_CHARS].strip()


def clean_variables(raw: Mapping[Any, Any] | None) -> dict[str, str]:
    """Only well-named variables with text values, at most MAX_VARIABLES of them."""
    out: dict[str, str] = {}
    for name, value in (raw or {}).items():
        if len(out) >= MAX_VARIABLES:
            break
        if not isinstance(name, str) or not NAME.match(name):
            continue
        cleaned = clean_value(value)
        if cleaned is not None:
            out[name] = cleaned
    return out


def builtin_variables(dialled: str | None, caller: str | None) -> dict[str, str]:
    return clean_variables(dict(zip(BUILTINS, (caller or "", dialled or ""))))


def carried_variables(raw: Mapping[Any, Any] | None) -> dict[str, str]:
    """Variables from an untrusted or third-party source: cleaned, built-ins removed."""
    return {k: v for k, v in clean_variables(raw).items() if k not in BUILTINS}


def token_travels_in_clear(url: str) -> bool:
    """A bearer token to this URL would cross a network unencrypted."""
    from urllib.parse import urlsplit
    import ipaddress

    parts = urlsplit(url)
    if parts.scheme == "https":
        return False
    host = parts.hostname or ""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


@dataclass(frozen=True)
class LookupSettings:
    url: str | None = None
    timeout_ms: int = 400
    token_env: str | None = None  # bearer token from this environment variable


class ContextLookup:
    """The CRM lookup; one aiohttp session for the server's life."""

    def __init__(self, settings: LookupSettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self._http = None

    @property
    def enabled(self) -> bool:
        return bool(self.settings.url)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def fetch(self, request: dict, slog) -> dict[str, str]:
        """The variables the CRM knows ({} on any failure, which is logged and counted)."""
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession()
        headers = {"Content-Type": "application/json"}
        token = os.environ.get(self.settings.token_env) if self.settings.token_env else None
        if token and token_travels_in_clear(self.settings.url):
            # the start check refuses this config; never send the token in clear regardless
            self.metrics.context_lookups.labels("refused_plain_http").inc()
            slog.warning("context_lookup_refused", reason="bearer token over plain http")
            return {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        t0 = time.monotonic()
        outcome, found = "ok", {}
        try:
            async with asyncio.timeout(self.settings.timeout_ms / 1000):
                async with self._http.post(self.settings.url, data=json.dumps(request), headers=headers,
                                           allow_redirects=False) as resp:
                    body = await _read_at_most(resp, MAX_LOOKUP_BYTES + 1)
                    if resp.status >= 300:
                        outcome = "error"
                        slog.warning("context_lookup_failed", status=resp.status)
                    elif len(body) > MAX_LOOKUP_BYTES:
                        outcome = "too_large"
                        slog.warning("context_lookup_too_large", limit_bytes=MAX_LOOKUP_BYTES)
                    else:
                        data = json.loads(body)
                        if not isinstance(data, dict):
                            raise ValueError("not a JSON object")
                        found = clean_variables(data)
        except TimeoutError:
            outcome = "timeout"
            slog.warning("context_lookup_timeout", timeout_ms=self.settings.timeout_ms)
        except (ValueError, UnicodeDecodeError) as exc:
            outcome = "invalid"
            slog.warning("context_lookup_invalid", error=type(exc).__name__)
        except Exception as exc:  # connection refused, reset, DNS...
            outcome = "error"
            slog.warning("context_lookup_failed", error=type(exc).__name__)
        self.metrics.context_lookups.labels(outcome).inc()
        if outcome == "ok":
            slog.info("context_lookup", variables=sorted(found), ms=round(1000 * (time.monotonic() - t0)))
        return found


async def _read_at_most(resp, limit: int) -> bytes:
    """The body, whole, or its first `limit` bytes (one read() returns what is buffered so far)."""
    chunks, size = [], 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class ContextResolver:
    """Admission's start hook: the call's variables from every source, then its start.

    `start(session, variables)` gives the call to the scheduler (which renders the persona's
    prompt with them, on its preparation thread)."""

    def __init__(self, lookup: ContextLookup, start: Callable[[Any, dict[str, str]], None]):
        self.lookup = lookup
        self._start = start
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's loop, for lookups

    def begin_request(self, session, request) -> None:
        """Admission's start hook (`telephony.admission.CallRequest`)."""
        self.begin(session, request.dialled, request.caller, request.variables)

    def begin(self, session, dialled: str | None, caller: str | None, carried: Mapping[str, Any]) -> None:
        """Any thread; never blocks (a lookup is handed to the event loop)."""
        builtins = builtin_variables(dialled, caller)
        values = {**carried_variables(carried), **builtins}
        if not self.lookup.enabled or self.loop is None:
            self._go(session, values)
            return
        request = {"call_id": session.call_id, "endpoint": session.endpoint,
                   "dialled_number": builtins.get("dialled_number", ""),
                   "caller_number": builtins.get("caller_number", ""), "variables": values}
        asyncio.run_coroutine_threadsafe(self._lookup_then_start(session, request, values, builtins), self.loop)

    async def _lookup_then_start(self, session, request: dict, values: dict[str, str],
                                 builtins: dict[str, str]) -> None:
        found = await self.lookup.fetch(request, session.log)
        if session.state is not CallState.ENDED:  # the caller may have hung up meanwhile
            self._go(session, {**values, **carried_variables(found), **builtins})

    def _go(self, session, values: dict[str, str]) -> None:
        session.variables = values
        session.log.info("call_context", variables=sorted(k for k, v in values.items() if v))
        self._start(session, values)
