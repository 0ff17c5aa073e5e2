"""The prompt playground: ops staff try any prompt, voice and sampling from the page, then save it
as a persona file.

A playground call's persona is built from the form with the same parser and checks as persona
files (`agent.personas.schema.parse_persona`), so what the page can call is exactly what a file
can say, and "Save as persona YAML" produces a file `personas check` accepts. Sampling from the
sliders is the persona's `sampling:` override: it applies to the call. Off unless
`webrtc.playground`. Without a token it answers only a client on this very host: the request's
peer address is loopback and nothing forwarded it (a reverse proxy on the same host also connects
from 127.0.0.1, so a request carrying forwarding headers from a proxy we do not trust is not
local; through a trusted proxy the client's own address counts). Anyone else needs
`Authorization: Bearer $<webrtc.playground_token_env>`. Posts are cross-site-request safe: they
must be JSON (`Content-Type: application/json`, which a plain HTML form cannot send), and a
browser's `Origin`, when sent, must be this server's own.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from aiohttp import web

from agent.personas.numbers import normalize_number
from telephony.security.limits import client_ip, parse_networks
from agent.personas.safe_yaml import Located
from agent.personas.schema import (KIND_FIELDS, KINDS, LIST_FIELDS, SAMPLING_FIELDS, Persona, PersonaError, PersonaIssue,
                                   parse_persona)
from agent.personas.schema import ID_RE as PERSONA_ID
from telephony.transport import Catalog

SOURCE = Path("<playground>")
MAX_ITEMS = 50
MAX_TEXT = 2000
#: the fields the form may set, per kind, and the common ones (no numbers, paths or transfer)
FORM_FIELDS = {kind: sorted(fields) for kind, fields in KIND_FIELDS.items()}
COMMON = ("voice", "sampling", "variables")


FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP", "X-Forwarded-Host")


def same_origin(request: web.Request) -> bool:
    """No `Origin` (not a browser's cross-site request), or this server's own."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return bool(parts.netloc) and parts.netloc.lower() == (request.host or "").lower()


class Playground:
    def __init__(self, cfg, trusted_proxies: tuple[str, ...], catalog: Catalog):
        self.cfg = cfg  # webrtc settings
        self.trusted = parse_networks(trusted_proxies)
        self.catalog = catalog

    @property
    def enabled(self) -> bool:
        return self.cfg.playground

    def from_this_host(self, request: web.Request) -> bool:
        """The client itself is on this host (see the module doc)."""
        peer = client_ip(request.remote, [], [])
        if peer is None:
            return False
        if any(h in request.headers for h in FORWARDING_HEADERS) and not any(peer in n for n in self.trusted):
            return False  # a proxy we do not know relayed it: whoever is behind it is not local
        ip = client_ip(request.remote, request.headers.getall("X-Forwarded-For", []), self.trusted)
        return ip is not None and ip.is_loopback

    def refusal(self, request: web.Request) -> web.Response | None:
        """Why this request may not use the playground (None: it may)."""
        if not self.enabled:
            return web.json_response({"error": "not_found", "reason": "the playground is off"}, status=404)
        if request.method == "POST":
            if not same_origin(request):
                return web.json_response({"error": "forbidden", "reason": "cross-site request"}, status=403)
            if request.content_type != "application/json":
                return web.json_response({"error": "unsupported_media_type",
                                          "reason": "the playground takes JSON posts only"}, status=415)
        if self.from_this_host(request):
            return None
        token = os.environ.get(self.cfg.playground_token_env)
        if not token:
            return web.json_response({"error": "forbidden", "reason": "the playground is for this host only: set "
                                      f"{self.cfg.playground_token_env} on the server for others"}, status=403)
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"error": "unauthorized", "reason": "playground token missing or wrong"},
                                     status=401, headers={"WWW-Authenticate": "Bearer"})
        return None

    def voices(self) -> list[str]:
        return self.catalog.voices()

    async def info(self, request: web.Request) -> web.Response:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        s = self.catalog.sampling
        return web.json_response({
            "voices": self.voices(), "kinds": list(KINDS), "fields": FORM_FIELDS, "list_fields": list(LIST_FIELDS),
            "sampling": {k: getattr(s, k) for k in SAMPLING_FIELDS}})

    def persona(self, spec: Any) -> Persona:
        """The form as a persona; PersonaError (file "<playground>") names what is wrong."""
        if not isinstance(spec, dict):
            raise PersonaError([_issue("the playground call needs a JSON object of persona fields")])
        kind = spec.get("kind", "service")
        allowed = set(FORM_FIELDS.get(kind, ())) | set(COMMON) | {"kind"}
        fields: dict[str, Located] = {}
        for key, value in spec.items():
            if key not in allowed:
                raise PersonaError([_issue(f"field '{key}' cannot be set from the playground", key)])
            if isinstance(value, str) and len(value) > MAX_TEXT or isinstance(value, list) and (
                    len(value) > MAX_ITEMS or any(isinstance(x, str) and len(x) > MAX_TEXT for x in value)):
                raise PersonaError([_issue(f"'{key}' is too long for the playground", key)])
            if key in ("information", "background") and isinstance(value, list):
                value = [x for x in value if not (isinstance(x, str) and not x.strip())]  # blank lines
            fields[key] = Located(value, 1)
        fields.setdefault("id", Located("playground", 1))
        return parse_persona(SOURCE, fields, 1, set(self.voices()), allow_voice_paths=False)

    async def save_yaml(self, request: web.Request) -> web.Response:
        """The form as a persona file (checked by the same parser first)."""
        refused = self.refusal(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
            spec = dict(body.get("persona") or {})
            persona_id = str(body.get("id") or "my-persona")
            numbers = [str(n) for n in body.get("numbers") or []]
        except (ValueError, TypeError, AttributeError, RecursionError):
            return web.json_response({"error": "bad_request", "reason": "expected {persona, id, numbers}"}, status=400)
        problems = []
        if not PERSONA_ID.match(persona_id):
            problems.append(f"id {persona_id!r}: lowercase letters, digits, '-' or '_'")
        for n in numbers:
            try:
                normalize_number(n)
            except ValueError as exc:
                problems.append(f"numbers: {exc}")
        try:
            self.persona(spec)
        except PersonaError as exc:
            problems += [str(i) for i in exc.issues]
        if problems:
            return web.json_response({"error": "invalid", "problems": problems}, status=400)
        doc = {"id": persona_id, "kind": spec.get("kind", "service")}
        if numbers:
            doc["numbers"] = numbers
        for key in FORM_FIELDS.get(doc["kind"], ()):
            if spec.get(key):
                doc[key] = spec[key]
        for key in COMMON:
            if spec.get(key):
                doc[key] = spec[key]
        text = ("# Drafted in the PersonaPlex playground; check it with: personaplex-agent personas check\n"
                + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100))
        return web.Response(text=text, content_type="application/x-yaml",
                            headers={"Content-Disposition": f'attachment; filename="{persona_id}.yaml"'})


def _issue(message: str, field: str | None = None) -> PersonaIssue:
    return PersonaIssue(str(SOURCE), None, field, message)
