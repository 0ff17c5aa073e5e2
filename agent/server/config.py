"""Server configuration (`configs/*.yaml`), validated with field-level messages.

Secrets never live in logs: they are `SecretStr`, and environment variables override them
(`HF_TOKEN`, `PERSONAPLEX_SIP_PASSWORD`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from agent.barge_in import BargeInConfig
from agent.errors import AgentError
from agent.sampling import SamplingParams
from agent.scheduler import SchedulerConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    source: Literal["auto", "hf", "dir", "demo"] = "auto"  # auto: dir if given, else HF if cached/token, else demo
    hf_repo: str = "nvidia/personaplex-7b-v1"
    dir: Path | None = None
    device: str = "auto"
    cpu_offload: bool = False
    hf_token: SecretStr | None = None
    # torch's CPU threads: 0 = one fewer than the cores (the transports and VAD need one; see
    # agent/threads.py)
    cpu_threads: int = Field(0, ge=0, le=1024)


class SamplingConfig(_Strict):
    greedy: bool = False
    temp_audio: float = Field(0.8, ge=0, le=5)
    temp_text: float = Field(0.7, ge=0, le=5)
    topk_audio: int = Field(250, ge=0)
    topk_text: int = Field(25, ge=0)

    def to_params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump())


class BargeInSettings(_Strict):
    enabled: bool = True
    vad_threshold: float = Field(0.5, gt=0, lt=1)
    min_speech_ms: int = Field(160, ge=0, le=5000)
    agent_guard_ms: int = Field(300, ge=0, le=5000)
    agent_active_dbfs: float = Field(-42.0, le=0)
    agent_release_ms: int = Field(240, ge=0, le=5000)

    def to_config(self) -> BargeInConfig:
        return BargeInConfig(**self.model_dump())


class EngineConfig(_Strict):
    max_calls: int = Field(4, ge=1, le=1024)
    max_call_seconds: float | None = Field(230.0, gt=0)
    context_policy: Literal["hangup", "slide"] = "hangup"
    idle_timeout_s: float = Field(20.0, gt=0)
    retry_after_s: int = Field(5, ge=1)
    # caller audio waits at most this long for the engine; older audio is dropped (and counted)
    max_latency_ms: float = Field(400.0, ge=80, le=5000)
    prefill_batch: int = Field(4, ge=1, le=64)  # calls whose prompts are prefilled in one forward
    prewarm: bool = True  # load every persona's voice (encode custom wavs) before their first call
    sampling: SamplingConfig = SamplingConfig()
    barge_in: BargeInSettings = BargeInSettings()

    def to_scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_calls=self.max_calls, max_call_seconds=self.max_call_seconds, context_policy=self.context_policy,
            idle_timeout_s=self.idle_timeout_s, retry_after_s=self.retry_after_s,
            max_latency_ms=self.max_latency_ms, prefill_batch=self.prefill_batch,
            barge_in=self.barge_in.to_config(), default_sampling=self.sampling.to_params())


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


class CallTokens(_Strict):
    """Signed browser-call tokens (JWT HS256, agent/security/tokens.py)."""

    secret_env: str | None = None  # environment variable holding the shared secret
    required: bool = False  # true: /api/call without a valid token gets 401
    max_ttl_s: int = Field(300, ge=10, le=86400)


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
    # honour the page's per-call "context" (variables for the persona's placeholders): browser
    # callers are untrusted, so off unless the page is yours and behind your own checks
    client_context: bool = False
    # the "Try a prompt" panel (any prompt, voice and sampling, then "Save as persona YAML");
    # off the loopback address it needs `Authorization: Bearer $<playground_token_env>`
    playground: bool = False
    playground_token_env: str = "PERSONAPLEX_PLAYGROUND_TOKEN"
    tokens: CallTokens = CallTokens()
    limits: ClientLimitsConfig = ClientLimitsConfig()


class OpsConfig(_Strict):
    """The operators' listener: /metrics, /api/calls, persona problems (never on the public port)."""

    host: str = "127.0.0.1"
    port: int = Field(9100, ge=0, le=65535)  # 0: no ops listener
    token_env: str | None = None  # when set: those endpoints need `Authorization: Bearer $<token_env>`


class ContextConfig(_Strict):
    """Per-call context from the company's CRM (see agent/context.py)."""

    lookup_url: str | None = None  # POST {call_id, endpoint, dialled_number, caller_number, variables}
    lookup_timeout_ms: int = Field(400, ge=10, le=10000)
    lookup_token_env: str | None = None  # environment variable with a bearer token for the lookup

    def to_settings(self):
        from agent.context import LookupSettings

        return LookupSettings(self.lookup_url, self.lookup_timeout_ms, self.lookup_token_env)


class TwilioConfig(_Strict):
    """Twilio Media Streams: point a number's voice webhook at POST /twilio/voice."""

    enabled: bool = False
    # environment variable holding the account's auth token; when it is set, every webhook and
    # stream request must carry a valid X-Twilio-Signature (403 otherwise)
    auth_token_env: str = "TWILIO_AUTH_TOKEN"
    # the base URL Twilio calls (https://agent.example.com): what it signs, and where the stream
    # URL points; default: the request's own URL (right when nothing rewrites it on the way)
    public_url: str | None = None
    parameters: dict[str, str] = {}  # extra <Parameter>s on every stream (e.g. persona: citysan)
    idle_timeout_s: float = Field(10.0, gt=0)

    @field_validator("public_url")
    @classmethod
    def _base(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("https://", "http://")):
            raise ValueError("must be an absolute http(s):// base URL")
        return v.rstrip("/") if v else v


class TelnyxConfig(_Strict):
    """Telnyx media streaming: stream_url wss://HOST/telnyx/media in call control or TeXML."""

    enabled: bool = False
    idle_timeout_s: float = Field(10.0, gt=0)
    l16_byteorder: Literal["big", "little"] = "big"  # RTP's L16 is network order
    # the bidirectional codec when it differs from the stream's media_format (None: the same)
    outbound_encoding: Literal["mulaw", "l16"] | None = None
    outbound_rate: int = Field(8000, ge=8000, le=48000)


class SipRegistration(_Strict):
    registrar: str  # sip:pbx.example.com
    user: str
    password: SecretStr | None = None
    realm: str = "*"
    expires_s: int = Field(300, ge=30)


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
    rtp_timeout_s: float = Field(15.0, gt=0)
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
        import ipaddress

        for net in v:
            ipaddress.ip_network(net, strict=False)
        return v


class LoggingConfig(_Strict):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class RecordingConfig(_Strict):
    enabled: bool = False
    dir: Path = Path("recordings")
    max_files: int = Field(200, ge=1)  # oldest calls are deleted beyond this many


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
    logging: LoggingConfig = LoggingConfig()
    recording: RecordingConfig = RecordingConfig()
    drain_timeout_s: float = Field(30.0, ge=0)


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
        raw = yaml.safe_load(p.read_text()) or {}
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
