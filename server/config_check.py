"""What a config needs from its environment before the server may start, and what is unsafe.

One mechanism for every secret: a setting names an environment variable (`*_env`), the
variable holds the secret, and a feature that needs one fails closed. `errors()` are what stop
the server at start (each one sentence saying what to set) and make `config-check` exit 1;
`warnings()` are valid but unsafe where strangers can reach (`config-check --strict` fails on
them too). Both read the environment they are given, so the CLI, the server and the tests ask
the same question.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from agent.calls.context import token_travels_in_clear
from telephony.security.secrets import MIN_BEARER_TOKEN_CHARS, MIN_SIGNING_SECRET_BYTES, env_secret
from server.config import ServerConfig

def is_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _bearer(name: str, what: str, setting: str, env: Mapping[str, str]) -> str | None:
    """One sentence when `$name` is unset or too short to be a token, else None."""
    value = env_secret(name, env)
    if value is None:
        return f"{what} needs a token: set ${name} ({setting}) to a random string of at least " \
               f"{MIN_BEARER_TOKEN_CHARS} characters"
    if len(value) < MIN_BEARER_TOKEN_CHARS:
        return f"${name} ({setting}) is too short for a token: use a random string of at least " \
               f"{MIN_BEARER_TOKEN_CHARS} characters (e.g. `openssl rand -hex 24`)"
    return None


def errors(cfg: ServerConfig, env: Mapping[str, str] | None = None) -> list[str]:
    """Settings the server refuses to start with, one sentence each saying what to set."""
    env = os.environ if env is None else env
    out: list[str] = []

    ops = cfg.ops
    if ops.port:
        if ops.token_env:
            problem = _bearer(ops.token_env, "the ops listener", "ops.token_env", env)
            if problem:
                out.append(problem)
        elif not is_local(ops.host):
            out.append(f"the ops listener binds {ops.host}, off loopback: set ops.token_env to an environment "
                       "variable holding its bearer token (or ops.host: 127.0.0.1)")

    web = cfg.webrtc
    if web.enabled:
        tok = web.tokens
        secret = env_secret(tok.secret_env, env)
        if tok.required and secret is None:
            out.append(f"webrtc.tokens.required needs the signing secret: set "
                       f"${tok.secret_env or 'PERSONAPLEX_TOKEN_SECRET'} (webrtc.tokens.secret_env) to a random "
                       f"key of at least {MIN_SIGNING_SECRET_BYTES} bytes")
        elif secret is not None and len(secret.encode()) < MIN_SIGNING_SECRET_BYTES:
            out.append(f"${tok.secret_env} (webrtc.tokens.secret_env) is {len(secret.encode())} bytes: call-token "
                       f"secrets must be at least {MIN_SIGNING_SECRET_BYTES} random bytes (e.g. `openssl rand -hex 32`)")
        if web.playground and not is_local(cfg.http.host):
            problem = _bearer(web.playground_token_env, "the prompt playground off loopback",
                              "webrtc.playground_token_env", env)
            if problem:
                out.append(problem)

    tw = cfg.twilio
    if tw.enabled and not tw.allow_unsigned and env_secret(tw.auth_token_env, env) is None:
        out.append(f"twilio.enabled needs the account's auth token to check Twilio's signatures: set "
                   f"${tw.auth_token_env} (twilio.auth_token_env), or twilio.allow_unsigned: true for loopback "
                   "tests only")

    tx = cfg.telnyx
    if tx.enabled and not tx.allow_unauthenticated:
        if not tx.stream_auth_token_env:
            out.append("telnyx.enabled needs a stream token: set telnyx.stream_auth_token_env to the environment "
                       "variable holding the stream_auth_token you configure at Telnyx (or "
                       "telnyx.allow_unauthenticated: true for loopback tests only)")
        else:
            problem = _bearer(tx.stream_auth_token_env, "telnyx media streams", "telnyx.stream_auth_token_env", env)
            if problem:
                out.append(problem)

    wh = cfg.webhooks
    if wh.enabled:
        setting = "webhooks.call_end.url" if wh.call_end.url else "webhooks.call_start.url"
        secret = env_secret(wh.secret_env, env)
        if secret is None:
            out.append(f"{setting} needs a signing secret: set ${wh.secret_env} (webhooks.secret_env) to a random "
                       f"key of at least {MIN_SIGNING_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`)")
        elif len(secret.encode()) < MIN_SIGNING_SECRET_BYTES:
            out.append(f"${wh.secret_env} (webhooks.secret_env) is {len(secret.encode())} bytes: webhook signing "
                       f"secrets must be at least {MIN_SIGNING_SECRET_BYTES} random bytes (e.g. `openssl rand -hex 32`)")

    ob = cfg.outbound
    if ob.enabled:
        if not cfg.sip.enabled:
            out.append("outbound.enabled places calls over SIP: set sip.enabled: true (or outbound.enabled: false)")
        if not ops.port:
            out.append("outbound.enabled is driven from the ops listener (POST /api/calls): set ops.port")
        elif not ops.token_env:
            out.append("outbound.enabled lets whoever reaches the ops listener place calls: set ops.token_env to "
                       "an environment variable holding its bearer token")

    ctx = cfg.context
    if ctx.lookup_url and ctx.lookup_token_env and token_travels_in_clear(ctx.lookup_url):
        out.append(f"context.lookup_url is plain http:// to {urlsplit(ctx.lookup_url).hostname}: the CRM bearer "
                   "token (context.lookup_token_env) would travel in clear; use https://")
    return out


def warnings(cfg: ServerConfig) -> list[str]:
    out = []
    http, web = cfg.http, cfg.webrtc
    public = http.enabled and not is_local(http.host)
    tls = bool(http.ssl_dir or (http.cert_file and http.key_file))
    if public and not tls:
        out.append(f"http listens on {http.host} without TLS: callers' audio signalling and tokens travel in "
                   "clear (set http.ssl_dir or cert_file/key_file, or terminate TLS in front)")
    if public and web.enabled and not web.tokens.required:
        out.append("browser calls are open to anyone who reaches the page: set webrtc.tokens.required with "
                   "webrtc.tokens.secret_env (signed call tokens from your website)")
    if public and web.enabled and not web.limits.enabled:
        out.append("per-client limits are off on a public page (webrtc.limits.enabled)")
    if cfg.console.enabled and cfg.ops.port and not cfg.ops.token_env:
        out.append("the supervisor console has no sign-in: anyone who reaches the ops listener on this host can "
                   "watch, listen to and hang up calls; set ops.token_env (or console.enabled: false)")
    if cfg.twilio.enabled and cfg.twilio.allow_unsigned:
        out.append("twilio.allow_unsigned is on: anyone who reaches /twilio/voice and /twilio/media can place "
                   "calls (loopback tests only)")
    if cfg.telnyx.enabled and cfg.telnyx.allow_unauthenticated:
        out.append("telnyx.allow_unauthenticated is on: anyone who reaches /telnyx/media can place calls "
                   "(loopback tests only)")
    for name, target in (("call_end", cfg.webhooks.call_end), ("call_start", cfg.webhooks.call_start)):
        if target.url and token_travels_in_clear(target.url):
            out.append(f"webhooks.{name}.url is plain http:// to {urlsplit(target.url).hostname}: call details and "
                       "transcripts would travel in clear (use https://)")
    if cfg.sip.enabled and not is_local(cfg.sip.host) and any(
            ipaddress.ip_network(n, strict=False).prefixlen == 0 for n in cfg.sip.allow_from):
        out.append("sip.allow_from lets any address INVITE directly (0.0.0.0/0)")
    return out
