"""What `config-check` warns about: settings that are valid but unsafe where strangers can reach."""

from __future__ import annotations

import ipaddress

from agent.server.config import ServerConfig


def is_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
    if not is_local(cfg.ops.host) and not cfg.ops.token_env:
        out.append(f"the ops listener ({cfg.ops.host}:{cfg.ops.port}: metrics, calls, persona problems) is not "
                   "on localhost and needs no token: set ops.token_env")
    if web.playground and public:
        out.append("the prompt playground is on where strangers reach it: it needs "
                   f"${web.playground_token_env} set (or webrtc.playground: false)")
    if cfg.sip.enabled and not is_local(cfg.sip.host) and "0.0.0.0/0" in cfg.sip.allow_from:
        out.append("sip.allow_from lets any address INVITE directly (0.0.0.0/0)")
    return out
