"""`personaplex-agent serve --config configs/demo.yaml`."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path


def _refuse_unsafe_start(cfg) -> int:
    """Fail closed: a setting that needs a secret the environment lacks stops the server here,
    with one sentence saying what to set (the same sentences `config-check` prints)."""
    import structlog

    from server.config_check import errors, warnings

    log = structlog.get_logger(__name__)
    problems = errors(cfg)
    for problem in problems:
        log.critical("config_refused", problem=problem)
    if problems:
        sys.stderr.write("".join(f"error: {p}\n" for p in problems))
        return 2
    for warning in warnings(cfg):
        log.warning("config_unsafe", warning=warning)
    return 0


def cmd_serve(args) -> int:
    from server.logging_setup import configure_logging
    from server.config import load_config
    from server.runtime import Runtime

    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: dump thread stacks
    faulthandler.enable(all_threads=True)  # a crash in native code leaves every thread's stack
    cfg = load_config(args.config, base_dir=Path.cwd())
    if args.port is not None:
        cfg.http.port = args.port
    if args.sip_port is not None:
        cfg.sip.port = args.sip_port
    if args.ssl is not None:
        cfg.http.ssl_dir = Path(args.ssl)
    configure_logging(args.log_format if args.log_format != "auto" else cfg.logging.format,
                      cfg.logging.level if args.log_level == "info" else args.log_level)
    refused = _refuse_unsafe_start(cfg)
    if refused:
        return refused
    # recordings, the TLS key, anything the server writes: owner-only from the moment it exists
    os.umask(0o077)
    try:
        return asyncio.run(Runtime(cfg).serve_forever())
    except Exception as exc:
        # A start that failed (a taken port, a bad certificate): say why and exit 1 now. Tearing
        # the interpreter down normally after pjsua2 and torch have run can abort in their native
        # destructors, which would bury the reason under a crash.
        import structlog

        structlog.get_logger(__name__).critical("start_failed", error=str(exc), exc_info=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def cmd_config_check(args) -> int:
    """Exit 0 when the server would start with this config and environment, 1 on errors (what
    `serve` refuses), and with --strict also 1 on warnings (what the systemd unit runs)."""
    from server.config import load_config
    from server.config_check import errors, warnings

    cfg = load_config(args.config)
    bad, found = errors(cfg), warnings(cfg)
    for e in bad:
        sys.stdout.write(f"error: {e}\n")
    for w in found:
        sys.stdout.write(f"warning: {w}\n")
    failed = bool(bad) or (args.strict and bool(found))
    status = "FAILED" if failed else "ok"
    counts = [f"{n} {what}" for n, what in ((len(bad), "error(s)"), (len(found), "warning(s)")) if n]
    sys.stdout.write(f"{status}: {args.config}" + (f" ({', '.join(counts)})" if counts else "") + "\n")
    return 1 if failed else 0


def cmd_token_mint(args) -> int:
    """A signed browser-call token, as a company's backend would make it."""
    from agent.calls.context import clean_variables
    from server.cli.personas import _vars
    from telephony.security.tokens import mint

    from telephony.security.secrets import MIN_SIGNING_SECRET_BYTES

    env = args.secret_env
    if args.config:
        from server.config import load_config

        env = load_config(args.config).webrtc.tokens.secret_env or env
    secret = os.environ.get(env)
    if not secret:
        sys.stderr.write(f"error: set the shared secret in ${env} (webrtc.tokens.secret_env)\n")
        return 2
    if len(secret.encode()) < MIN_SIGNING_SECRET_BYTES:
        sys.stderr.write(f"error: ${env} is shorter than {MIN_SIGNING_SECRET_BYTES} bytes: the agent refuses such "
                         "secrets\n")
        return 2
    sys.stdout.write(mint(secret, args.persona, args.ttl, clean_variables(_vars(args.var))) + "\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the voice agent server (WebRTC, SIP, metrics)")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--port", type=int, help="override http.port")
    p.add_argument("--sip-port", type=int, help="override sip.port")
    p.add_argument("--ssl", metavar="DIR", help="serve HTTPS with a temporary self-signed certificate kept in DIR "
                   "(browsers need a secure context for the microphone off localhost)")
    p.set_defaults(func=cmd_serve)
    t = sub.add_parser("token", help="signed browser-call tokens")
    tsub = t.add_subparsers(dest="token_command", required=True)
    m = tsub.add_parser("mint", help="print a call token (JWT HS256) for a persona")
    m.add_argument("--persona", required=True, help="persona id or number the call may go to")
    m.add_argument("--ttl", type=int, default=60, help="seconds the token is valid")
    m.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="a context variable (repeatable)")
    m.add_argument("--secret-env", default="PERSONAPLEX_TOKEN_SECRET", help="environment variable with the secret")
    m.add_argument("--config", help="take webrtc.tokens.secret_env from this server config")
    m.set_defaults(func=cmd_token_mint)
    c = sub.add_parser("config-check", help="validate a server config file")
    c.add_argument("config")
    c.add_argument("--strict", action="store_true", help="fail on warnings too (unsafe where strangers reach)")
    c.set_defaults(func=cmd_config_check)
