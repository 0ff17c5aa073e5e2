"""The server's config file as an operator writes it: mistakes are errors that say where."""

from __future__ import annotations

import pytest

from server.config import ConfigError, load_config
from tests.support import ROOT


def refusal(tmp_path, text: str) -> str:
    """What loading a config file holding `text` says (it must be refused), with the file's path."""
    p = tmp_path / "server.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value)
    return str(exc.value)


def test_a_section_written_twice_is_an_error_naming_both_lines(tmp_path):
    said = refusal(tmp_path, "transcript:\n  caller: \"off\"\nlogging:\n  level: info\ntranscript:\n  keep: true\n")
    assert "'transcript' appears twice (first on line 1)" in said and "line 5" in said, said


def test_a_key_written_twice_inside_a_section_is_an_error_too(tmp_path):
    assert "'max_calls' appears twice" in refusal(tmp_path, "engine:\n  max_calls: 4\n  max_calls: 8\n")


def test_shipped_configs_are_valid():
    for name in ("demo.yaml", "production.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.engine.max_calls >= 1


def test_config_errors_name_the_field(tmp_path):
    msg = refusal(tmp_path, "engine:\n  max_calls: 0\n  context_policy: forever\nhttp:\n  prot: 80\nsip:\n"
                            "  allow_from: [nonsense]\n")
    assert "engine.max_calls: Input should be greater than or equal to 1" in msg
    assert "engine.context_policy: Input should be 'reprime', 'hangup' or 'slide'" in msg
    assert "http.prot: unknown setting" in msg
    assert "sip.allow_from" in msg
    assert "mapping of sections" in refusal(tmp_path, "- not a mapping\n")
    assert "YAML error" in refusal(tmp_path, "engine: [unclosed\n")


def test_secrets_from_environment_and_never_shown(tmp_path, monkeypatch):
    p = tmp_path / "c.yaml"
    p.write_text("sip:\n  registration:\n    registrar: sip:pbx.example.com\n    realm: pbx.example.com\n"
                 "    user: '100'\n    password: filepw\n"
                 "model:\n  hf_token: hf_file\n")
    monkeypatch.setenv("PERSONAPLEX_SIP_PASSWORD", "envpw-secret")
    monkeypatch.setenv("HF_TOKEN", "hf_env_secret")
    cfg = load_config(p)
    assert cfg.sip.registration.password.get_secret_value() == "envpw-secret"
    assert cfg.model.hf_token.get_secret_value() == "hf_env_secret"
    dumped = repr(cfg) + cfg.model_dump_json()
    assert "envpw-secret" not in dumped and "hf_env_secret" not in dumped


def test_a_console_without_the_ops_token_is_warned_about():
    from server.config import ServerConfig
    from server.config_check import warnings

    says = "the supervisor console has no sign-in"
    assert any(says in w for w in warnings(ServerConfig()))
    assert not any(says in w for w in warnings(ServerConfig.model_validate({"ops": {"token_env": "OPS_TOKEN"}})))
    assert not any(says in w for w in warnings(ServerConfig.model_validate({"console": {"enabled": False}})))


@pytest.mark.parametrize("engine, limit", [
    ("{}", 3600.0),  # re-prime keeps any call whole: the limit only ends a runaway one
    ("{context_policy: hangup}", 230.0),  # without re-prime: before the 240 s context is full
    ("{context_policy: slide}", 230.0),
    ("{context_policy: hangup, max_call_seconds: null}", None),  # said: no limit
    ("{context_policy: hangup, max_call_seconds: 600}", 600.0),
])
def test_an_unset_call_limit_follows_the_context_policy(tmp_path, engine, limit):
    p = tmp_path / "server.yaml"
    p.write_text(f"engine: {engine}\n")
    cfg = load_config(p)
    assert cfg.engine.max_call_seconds == limit
    assert cfg.engine.call_settings()["max_call_seconds"] == limit  # what the scheduler is given
