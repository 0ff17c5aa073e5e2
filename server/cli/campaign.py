"""`personaplex-agent campaign run leads.csv --persona P ...`: place a list of outbound calls
through a running server's ops API (`POST /api/calls`), see server/cli/campaign_run.py."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

import structlog

from agent.errors import BadInput

#: the environment variable the shipped production config names as `ops.token_env`
DEFAULT_TOKEN_ENV = "PERSONAPLEX_OPS_TOKEN"


def _positive(kind, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}: {text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{what} must be above 0")
        return value
    return parse


def _settings(args: argparse.Namespace):
    from server.cli.campaign_run import Settings
    from server.cli.campaign_timing import RetryPolicy, Window, parse_duration

    if args.retries < 0:
        raise BadInput("--retries cannot be negative")
    ring = parse_duration(args.ring_timeout) if args.ring_timeout else None
    return Settings(persona=args.persona, concurrency=args.concurrency, rate=args.rate,
                    policy=RetryPolicy(retries=args.retries, retry_after=parse_duration(args.retry_after)),
                    window=Window.parse(args.window), caller=args.caller, ring_timeout_s=ring,
                    poll_s=parse_duration(args.poll_interval))


def _check_ops_url(url: str, token: str | None) -> None:
    """An absolute http(s) URL, and never the ops token in clear across a network (the server
    refuses the same for its own bearer tokens)."""
    from urllib.parse import urlsplit

    from agent.calls.context import token_travels_in_clear

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadInput(f"--ops-url {url!r}: give the ops listener's address, e.g. http://127.0.0.1:9100")
    if token and token_travels_in_clear(url):
        raise BadInput(f"--ops-url is plain http:// to {parts.hostname}: the ops token would cross the network in "
                       "clear; use https:// (a TLS proxy in front of the ops listener) or an SSH tunnel to loopback")


def cmd_campaign_run(args: argparse.Namespace) -> int:
    from server.cli.campaign_leads import DoNotCall, fingerprint, read_leads
    from server.cli.campaign_results import write_results
    from server.cli.campaign_state import StateStore

    log = structlog.get_logger("campaign")
    settings = _settings(args)
    token = os.environ.get(args.ops_token_env) or None
    _check_ops_url(args.ops_url, token)
    leads, variables = read_leads(args.leads)
    if not leads:
        raise BadInput(f"{args.leads} has no rows to dial")
    dnc = DoNotCall.read(args.dnc) if args.dnc else DoNotCall()
    results = args.results or args.leads.with_name(args.leads.stem + ".results.csv")
    state_path = args.state or args.leads.with_name(args.leads.stem + ".campaign.sqlite")
    store, resumed = StateStore.open(state_path, leads, {"list": fingerprint(leads), "persona": args.persona})
    log.info("campaign_start", rows=len(leads), resumed=resumed, concurrency=settings.concurrency,
             rate=settings.rate, retries=settings.policy.retries, window=args.window or "all day",
             dnc_entries=len(dnc))
    try:
        finished, stopped_by, campaign = asyncio.run(
            _run(store, settings, dnc, args.ops_url, token, args.ops_token_env))
    except BaseException:
        write_results(results, store.rows(), variables)  # what the rows came to before the abort
        store.close()
        raise
    write_results(results, campaign.rows, variables)
    store.close()
    counts = campaign.summary()
    log.info("campaign_finished" if finished else "campaign_stopped", dialled=campaign.dialled,
             **{f"rows_{k}": v for k, v in sorted(counts.items())})
    tally = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    if finished:
        sys.stdout.write(f"campaign done: {tally}; results in {results}\n")
        return 0
    sys.stdout.write(f"campaign stopped ({tally}); run the same command to resume (state in {state_path}); "
                     f"results so far in {results}\n")
    return 128 + stopped_by if stopped_by else 1


async def _run(store, settings, dnc, ops_url: str, token: str | None, token_env: str):
    from server.cli.campaign_ops import OpsClient
    from server.cli.campaign_run import Campaign

    client = OpsClient(ops_url, token, token_env)
    campaign = Campaign(store, client, settings, dnc)
    got: list[int] = []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: (got.append(int(s)), campaign.stop()))
    try:
        finished = await campaign.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await client.close()
    return finished, (got[0] if got else 0), campaign


def register(sub) -> None:
    c = sub.add_parser("campaign", help="outbound call campaigns through a running server's ops API")
    csub = c.add_subparsers(dest="campaign_command", required=True)
    r = csub.add_parser("run", help="dial a list of numbers (CSV: a `number` column, the others call variables); "
                        "run it again after an interruption to resume")
    r.add_argument("leads", type=Path, help="CSV file with a header line and a `number` column")
    r.add_argument("--persona", required=True, help="persona id the calls speak as")
    r.add_argument("--ops-url", default="http://127.0.0.1:9100",
                   help="the server's ops listener (default: %(default)s)")
    r.add_argument("--ops-token-env", default=DEFAULT_TOKEN_ENV,
                   help="environment variable holding the ops bearer token (the server's ops.token_env; "
                        "default: %(default)s)")
    r.add_argument("--concurrency", type=_positive(int, "--concurrency"), default=1,
                   help="calls at once, at most (default: 1)")
    r.add_argument("--rate", type=_positive(float, "--rate"), default=1.0,
                   help="new calls per second, at most (default: 1)")
    r.add_argument("--retries", type=int, default=2, help="more attempts for a busy or unanswered number (default: 2)")
    r.add_argument("--retry-after", default="10m", help="wait before a retry: 30s, 10m, 2h (default: 10m)")
    r.add_argument("--window", default=None, help="local hours calls may start in, HH:MM-HH:MM (default: any time)")
    r.add_argument("--from", dest="caller", default=None, help="caller id to present (default: the server's)")
    r.add_argument("--ring-timeout", default=None, help="how long a call rings before it counts as no answer "
                   "(default: the server's)")
    r.add_argument("--dnc", type=Path, default=None, help="do-not-call file: one number per line, or a CSV")
    r.add_argument("--results", type=Path, default=None, help="results CSV (default: LEADS.results.csv)")
    r.add_argument("--state", type=Path, default=None, help="state file (default: LEADS.campaign.sqlite)")
    r.add_argument("--poll-interval", default="1s", help="how often a call in progress is looked up (default: 1s)")
    r.set_defaults(func=cmd_campaign_run)
