"""`personaplex-agent serve --config configs/demo.yaml`."""

from __future__ import annotations

import asyncio
from pathlib import Path


def cmd_serve(args) -> int:
    from agent.logging_setup import configure_logging
    from agent.server.config import load_config
    from agent.server.runtime import Runtime

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
    return asyncio.run(Runtime(cfg).serve_forever())


def cmd_config_check(args) -> int:
    import sys

    from agent.server.config import load_config

    load_config(args.config)
    sys.stdout.write(f"ok: {args.config}\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the voice agent server (WebRTC, SIP, metrics)")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--port", type=int, help="override http.port")
    p.add_argument("--sip-port", type=int, help="override sip.port")
    p.add_argument("--ssl", metavar="DIR", help="serve HTTPS with a temporary self-signed certificate kept in DIR "
                   "(browsers need a secure context for the microphone off localhost)")
    p.set_defaults(func=cmd_serve)
    c = sub.add_parser("config-check", help="validate a server config file")
    c.add_argument("config")
    c.set_defaults(func=cmd_config_check)
