"""Server configuration (`configs/*.yaml`), validated with field-level messages.

Secrets never live in logs: they are `SecretStr`, and environment variables override them
(`HF_TOKEN`, `PERSONAPLEX_SIP_PASSWORD`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from agent.errors import AgentError
from agent.calls.settings import CallSettings
from agent.personas.safe_yaml import UniqueKeyLoader

if TYPE_CHECKING:  # the scheduler imports torch: config checks and unit tests load no model
    from agent.calls.scheduler import SchedulerConfig


def _networks(v: list[str]) -> list[str]:
    """Addresses or networks (10.0.0.5, 10.0.0.0/8, fd00::/8): a typo is a config error at load,
    not a failure on every call."""
    import ipaddress

    for net in v:
        try:
            ipaddress.ip_network(net.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{net!r} is not an IP address or network") from None
    return [n.strip() for n in v]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    source: Literal["auto", "hf", "dir", "demo"] = "auto"  # auto: dir if given, else HF if CUDA and cached/token, else demo
    hf_repo: str = "nvidia/personaplex-7b-v1"
    dir: Path | None = None
    device: str = "auto"
    cpu_offload: bool = False
    hf_token: SecretStr | None = None
    # torch's CPU threads: 0 = one fewer than the cores (the transports and VAD need one; see
    # agent/threads.py)
    cpu_threads: int = Field(0, ge=0, le=1024)


class EngineConfig(CallSettings):
    """The `engine:` section: the call service's settings (`agent.calls.settings`: defaults and
    bounds there) and what the server does before the first call."""

    prewarm: bool = True  # load every persona's voice (encode custom wavs) before their first call

    def to_scheduler_config(self) -> SchedulerConfig:
        from agent.calls.scheduler import SchedulerConfig

        return SchedulerConfig(**self.call_settings())


class PersonasConfig(_Strict):
    dir: Path = Path("personas")
    unknown_numbers: Literal["default", "refuse"] = "default"
    reload_interval_s: float = Field(2.0, gt=0)


class HttpConfig(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8998, ge=0, le=65535)
    # proxies of ours (e.g. the HAProxy in front) whose X-Forwarded-For is believed for the
    # client's address; nobody else's is
    trusted_proxies: list[str] = []
    ssl_dir: Path | None = None  # a folder: a temporary self-signed certificate is made there
    cert_file: Path | None = None
    key_file: Path | None = None

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        return _networks(v)


class CallTokens(_Strict):
    """Signed browser-call tokens (JWT HS256, agent/security/tokens.py)."""

    secret_env: str | None = None  # environment variable holding the shared secret (>= 32 bytes)
    required: bool = False  # true: /api/call without a valid token gets 401
    max_ttl_s: int = Field(300, ge=10, le=86400)
    audience: str | None = None  # when set, a token's `aud` claim must name it
    # where used token ids are remembered: None = this process (a farm: each agent would take a
    # token once); redis://HOST:PORT/DB = shared by every agent (unreachable: token calls refused)
    replay_store: str | None = None

    @field_validator("replay_store")
    @classmethod
    def _store(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis:// (or rediss://, unix://) URL, e.g. redis://10.0.0.7:6379/0")
        return v


class ClientLimitsConfig(_Strict):
    """Per source address (agent/security/limits.py)."""

    enabled: bool = True
    concurrent_calls: int = Field(2, ge=1)
    attempts_per_minute: int = Field(10, ge=1)
    max_offer_bytes: int = Field(64 * 1024, ge=4096, le=16 * 1024 * 1024)
    channel_max_bytes: int = Field(4096, ge=64)  # data-channel messages larger are dropped
    channel_max_per_s: int = Field(20, ge=1)  # and beyond this many a second


class WebRtcConfig(_Strict):
    enabled: bool = True
    ice_servers: list[str] = []  # e.g. ["stun:stun.example.org:3478"]; none needed on a LAN/localhost
    connect_timeout_s: float = Field(20.0, gt=0)
    # the packet length answers ask browsers to send (a=ptime): 40 ms is half the packets of
    # Opus's default 20 (aiortc's per-packet Python is most of a WebRTC call's cost) for up to
    # 20 ms more before a caller's word reaches the model; 20 adds nothing
    caller_ptime_ms: Literal[20, 40, 60] = 40
    # honour the page's per-call "context" (variables for the persona's placeholders): browser
    # callers are untrusted, so off unless the page is yours and behind your own checks
    client_context: bool = False
    # the "Try a prompt" panel (any prompt, voice and sampling, then "Save as persona YAML");
    # off the loopback address it needs `Authorization: Bearer $<playground_token_env>`
    playground: bool = False
    playground_token_env: str = "PERSONAPLEX_PLAYGROUND_TOKEN"
    tokens: CallTokens = CallTokens()
    limits: ClientLimitsConfig = ClientLimitsConfig()


class EventStreamConfig(_Strict):
    """Bounds of each live event stream (`/api/calls/{id}/events`): a reader that falls this far
    behind is disconnected, so it can never slow a call or the other readers."""

    queue: int = Field(256, ge=4, le=100000)  # events waiting for one reader
    # bytes on their way to one reader (the socket's send buffer and the server's write buffer)
    buffer_bytes: int = Field(65536, ge=4096, le=16 * 1024 * 1024)
    keepalive_s: float = Field(15.0, gt=0, le=300)  # a comment line when nothing else was sent


class OpsConfig(_Strict):
    """The operators' listener: /metrics, /api/calls, live call events, persona problems (never
    on the public port)."""

    host: str = "127.0.0.1"
    port: int = Field(9100, ge=0, le=65535)  # 0: no ops listener
    # when set: those endpoints need `Authorization: Bearer $<token_env>`; the variable must then
    # hold a token (the server refuses to start otherwise), and off loopback it must be set
    token_env: str | None = None
    event_stream: EventStreamConfig = EventStreamConfig()


class ConsoleConfig(_Strict):
    """The supervisors' console in the browser (server/console), on the ops listener only."""

    enabled: bool = True
    # where a supervisor may transfer a live call: numbers or SIP URIs, picked from a list (no free text)
    transfer_targets: list[str] = []
    session_ttl_s: float = Field(8 * 3600.0, ge=60)  # a login lasts this long
    max_viewers: int = Field(16, ge=1, le=1000)  # open live "Now" streams at once


class ContextConfig(_Strict):
    """Per-call context from the company's CRM (see agent/context.py)."""

    lookup_url: str | None = None  # POST {call_id, endpoint, dialled_number, caller_number, variables}
    lookup_timeout_ms: int = Field(400, ge=10, le=10000)
    lookup_token_env: str | None = None  # environment variable with a bearer token for the lookup

    @field_validator("lookup_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("https://", "http://")):
            raise ValueError("must be an absolute http(s):// URL")
        return v

    def to_settings(self):
        from agent.calls.context import LookupSettings

        return LookupSettings(self.lookup_url, self.lookup_timeout_ms, self.lookup_token_env)


class TwilioConfig(_Strict):
    """Twilio Media Streams: point a number's voice webhook at POST /twilio/voice."""

    enabled: bool = False
    # environment variable holding the account's auth token: every webhook and stream request
    # must carry a valid X-Twilio-Signature (403 otherwise), and every stream the per-call grant
    # the webhook put in its TwiML. Enabled without it, the server refuses to start...
    auth_token_env: str = "TWILIO_AUTH_TOKEN"
    # ...unless this says so (loopback tests only: anyone can then open streams; warned)
    allow_unsigned: bool = False
    account_sid: str | None = None  # when set, a stream's start.accountSid must be this
    # how long after the webhook answered its stream may start (the grant's lifetime)
    stream_grant_ttl_s: int = Field(300, ge=5, le=86400)
    # the base URL Twilio calls (https://agent.example.com): what it signs, and where the stream
    # URL points; default: the request's own URL (right when nothing rewrites it on the way)
    public_url: str | None = None
    parameters: dict[str, str] = {}  # extra <Parameter>s on every stream (e.g. persona: citysan)

    @field_validator("public_url")
    @classmethod
    def _base(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("https://", "http://")):
            raise ValueError("must be an absolute http(s):// base URL")
        return v.rstrip("/") if v else v


class TelnyxConfig(_Strict):
    """Telnyx media streaming: stream_url wss://HOST/telnyx/media in call control or TeXML."""

    enabled: bool = False
    # environment variable holding the token you configure as Telnyx's `stream_auth_token`;
    # enabled without it the server refuses to start...
    stream_auth_token_env: str | None = None
    # ...unless this says so (loopback tests only: anyone can then open streams; warned)
    allow_unauthenticated: bool = False
    l16_byteorder: Literal["big", "little"] = "big"  # RTP's L16 is network order
    # the bidirectional codec when it differs from the stream's media_format (None: the same)
    outbound_encoding: Literal["mulaw", "l16"] | None = None
    outbound_rate: int = Field(8000, ge=8000, le=48000)


class SipRegistration(_Strict):
    registrar: str  # sip:pbx.example.com
    user: str
    password: SecretStr | None = None
    # the registrar's digest realm: our credentials answer only its challenges (a "*" would
    # hand them to any server that challenges a request of ours)
    realm: str
    expires_s: int = Field(300, ge=30)

    @field_validator("realm")
    @classmethod
    def _realm(cls, v: str) -> str:
        if not v.strip() or "*" in v:
            raise ValueError("must be the registrar's own realm (no '*': the password would answer any challenger)")
        return v


class SipConfig(_Strict):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(5060, ge=0, le=65535)
    public_address: str | None = None
    transports: list[Literal["udp", "tcp", "tls"]] = ["udp", "tcp"]
    tls_port: int | None = Field(None, ge=1, le=65535)  # default: port + 1 (5061 for 5060)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    allow_from: list[str] = ["127.0.0.0/8"]  # source networks allowed to INVITE directly (ACL)
    # INVITE headers whose values become per-call variables: {"X-Customer-Name": customer_name}
    context_headers: dict[str, str] = {}
    registration: SipRegistration | None = None
    codecs: list[str] = ["opus/48000", "G722/16000", "PCMU/8000", "PCMA/8000"]
    busy_code: Literal[486, 503] = 486
    rtp_port: int = Field(4000, ge=1024, le=65000)
    session_timer_s: int = Field(1800, ge=90)
    # pjsip's own verbosity (0-6); its lines are logged as structured "pjsip" events: level 1
    # errors, 2 warnings, 3 and up at debug
    pjsip_log_level: int = Field(3, ge=0, le=6)

    @field_validator("context_headers")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for header, var in v.items():
            if not re.match(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$", header):
                raise ValueError(f"{header!r} is not a SIP header name")
            if not re.match(r"^[a-z_][a-z0-9_]{0,63}$", var):
                raise ValueError(f"{var!r} is not a variable name (lowercase letters, digits, '_')")
        return v

    @field_validator("allow_from")
    @classmethod
    def _nets(cls, v: list[str]) -> list[str]:
        return _networks(v)


class QueueConfig(_Strict):
    """Callers on hold while every slot is busy (telephony/call_queue.py); off at max_waiting 0."""

    max_waiting: int = Field(0, ge=0, le=10000)  # callers on hold at most; one more is refused as busy
    max_wait_s: float = Field(120.0, gt=0)  # a caller on hold longer is refused as busy
    hold_audio: Path | None = None  # wav/ogg played (looped) while on hold; None: a soft built-in tone
    # SIP: "early_media" answers 183 Session Progress with the hold audio and 200 OK when a slot
    # comes; "answer" answers 200 OK at once (billing starts; some carriers drop long early media)
    sip_answer: Literal["early_media", "answer"] = "early_media"


class OutboundConfig(_Strict):
    """Calls the agent places (POST /api/calls on the ops listener, dialled over SIP): off by
    default; on, it needs the ops token (config_check) and dials only what `allowed_to` names."""

    enabled: bool = False
    # what may be dialled: E.164 prefixes ("+4930", "+1415555") or SIP URI patterns with `*`
    # ("sip:*@pbx.example.com"); empty: nothing
    allowed_to: list[str] = []
    # caller IDs (`from`) a request may present: the same kinds of patterns; empty: only the
    # agent's own SIP identity (a request without `from`)
    allowed_from: list[str] = []
    max_concurrent: int = Field(2, ge=1, le=1000)  # outbound calls dialling, ringing or answered at once
    # slots outbound calls never take: they stay free for inbound callers
    reserve_inbound: int = Field(1, ge=0)
    default_ring_timeout_s: float = Field(30.0, gt=0, le=300)  # unanswered this long: CANCEL, no_answer
    # answering-machine detection on the callee's first seconds (telephony/amd.py): `amd` in
    # GET /api/calls/{id}, the call_end webhook and the call record
    amd: bool = True
    on_machine: Literal["hangup", "talk"] = "hangup"  # a machine answered: hang up, or let the agent talk
    keep_ended_s: float = Field(600.0, ge=0, le=86400)  # GET /api/calls/{id} shows an ended call this long
    keep_ended_max: int = Field(1000, ge=0, le=100000)  # ... and at most this many ended calls

    @field_validator("allowed_to", "allowed_from")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        from telephony.outbound_policy import check_pattern

        for p in v:
            check_pattern(p)
        return v


class LoggingConfig(_Strict):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class RecordingConfig(_Strict):
    enabled: bool = False
    dir: Path = Path("recordings")
    max_files: int = Field(200, ge=1)  # oldest calls are deleted beyond this many


class TranscriptConfig(_Strict):
    """Both sides' words per call (agent/calls/transcript.py): personal data, never logged. The
    agent's words are always there (PersonaPlex's text stream)."""

    # kyutai: the caller's words too, by Kyutai's streaming STT on the caller codes the engine
    # computes anyway (agent/transcribe): the built-in tiny STT with the demo model, else
    # `caller_hf_repo` from Hugging Face; without its weights the server runs with it off (one
    # log line says why). off: the agent's words only
    caller: Literal["kyutai", "off"] = "kyutai"
    # kyutai/stt-1b-en_fr-candle: the same model with its semantic VAD heads (sess.end_of_turn)
    caller_hf_repo: str = "kyutai/stt-1b-en_fr"
    keep: bool = True  # false: records and webhooks keep who spoke when, not the words

    @field_validator("caller", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        """YAML 1.1 reads a bare `off` as false (and `on` as true): take them as meant."""
        if isinstance(v, bool):
            return "kyutai" if v else "off"
        return v


class WebhookTarget(_Strict):
    url: str | None = None  # POSTed the event's JSON, signed; unset: that event is not sent

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is not None:
            parts = urlsplit(v)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ValueError("must be an absolute http(s):// URL")
        return v


class WebhooksConfig(_Strict):
    """Signed POSTs of call events (server/webhooks): written to a queue on disk first, delivered
    at least once (idempotency key `<call_id>:<event>`), retried with backoff until `max_age_s`."""

    call_end: WebhookTarget = WebhookTarget()
    call_start: WebhookTarget = WebhookTarget()
    # environment variable holding the HMAC-SHA256 signing key (>= 32 bytes); a URL set without
    # it stops the server at start
    secret_env: str = "PERSONAPLEX_WEBHOOK_SECRET"
    timeout_s: float = Field(10.0, gt=0, le=300)  # per attempt: no answer by then counts as a failure
    max_age_s: float = Field(86400.0, gt=0)  # an event still undelivered this long after the call is dead-lettered
    max_queue: int = Field(10000, ge=10, le=10_000_000)  # events kept on disk, dead letters included
    retry_base_s: float = Field(2.0, gt=0, le=3600)  # first retry after about this long, doubling...
    retry_max_s: float = Field(600.0, gt=0, le=86400)  # ...up to this (each with jitter)
    concurrency: int = Field(4, ge=1, le=64)  # deliveries in flight at once
    drain_timeout_s: float = Field(5.0, ge=0, le=300)  # a stop waits this long for pending deliveries

    @property
    def enabled(self) -> bool:
        return bool(self.call_end.url or self.call_start.url)


class ServerConfig(_Strict):
    model: ModelConfig = ModelConfig()
    personas: PersonasConfig = PersonasConfig()
    engine: EngineConfig = EngineConfig()
    http: HttpConfig = HttpConfig()
    webrtc: WebRtcConfig = WebRtcConfig()
    sip: SipConfig = SipConfig()
    twilio: TwilioConfig = TwilioConfig()
    telnyx: TelnyxConfig = TelnyxConfig()
    context: ContextConfig = ContextConfig()
    ops: OpsConfig = OpsConfig()
    console: ConsoleConfig = ConsoleConfig()
    logging: LoggingConfig = LoggingConfig()
    recording: RecordingConfig = RecordingConfig()
    transcript: TranscriptConfig = TranscriptConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    queue: QueueConfig = QueueConfig()
    outbound: OutboundConfig = OutboundConfig()
    # where the agent keeps what must outlive a restart (the webhook queue); owner-only
    state_dir: Path = Path("state")
    drain_timeout_s: float = Field(30.0, ge=0)
    # no caller media for this long (RTP, the WebRTC track, a carrier's media frames) ends the
    # call with reason `media_timeout`, on every transport: a caller that vanished without
    # hanging up frees its slot (and its per-client reservation) quickly
    media_timeout_s: float = Field(5.0, gt=0)


class ConfigError(AgentError):
    pass


def _fmt_errors(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid configuration:"]
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting"
        lines.append(f"  {loc}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden"
                                           and not isinstance(err.get("input"), dict) else ""))
    return "\n".join(lines)


def load_config(path: str | Path, base_dir: Path | None = None) -> ServerConfig:
    p = Path(path)
    try:
        raw = yaml.load(p.read_text(), Loader=UniqueKeyLoader) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: YAML error: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a config file is a mapping of sections (model, engine, http, ...)")
    try:
        cfg = ServerConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_fmt_errors(p, exc)) from None
    # secrets from the environment win over the file
    if os.environ.get("HF_TOKEN"):
        cfg.model.hf_token = SecretStr(os.environ["HF_TOKEN"])
    sip_pw = os.environ.get("PERSONAPLEX_SIP_PASSWORD")
    if sip_pw and cfg.sip.registration is not None:
        cfg.sip.registration.password = SecretStr(sip_pw)
    # relative paths are relative to the config's folder's parent project (where the file lives)
    base = base_dir or Path.cwd()
    if not cfg.personas.dir.is_absolute():
        cfg.personas.dir = base / cfg.personas.dir
    return cfg
