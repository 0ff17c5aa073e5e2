"""Outbound calls' rules without a server: targets, allow-list patterns, SIP answers as states,
and the start checks that keep outbound closed unless an operator opens it."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from server.config import ServerConfig
from server.config_check import errors
from telephony.amd import MachineDetector, Verdict
from telephony.outbound import DialState, final_state
from telephony.outbound_policy import TargetError, allowed, check_pattern, parse_target


def test_targets_are_uris_or_numbers_without_formatting():
    assert parse_target(" +1 (415) 555-0100 ").text == "+14155550100"
    assert not parse_target("+14155550100").is_uri
    assert parse_target("sip:bob@pbx.example.com").is_uri
    for bad in ("bob", "+1 415 CALL NOW", "sip:bob @x", "sip:<x>", "", "tel:+4930"):
        with pytest.raises(TargetError):
            parse_target(bad)


def test_numbers_are_dialled_through_the_trunk_only():
    assert parse_target("+4930123").dial_uri("pbx.example.com:5060") == "sip:+4930123@pbx.example.com:5060"
    assert parse_target("sip:a@b").dial_uri(None) == "sip:a@b"
    with pytest.raises(TargetError, match="sip.registration"):
        parse_target("+4930123").dial_uri(None)


def test_patterns_match_their_own_kind_and_nothing_by_default():
    number, uri = parse_target("+493012345"), parse_target("sip:sales@pbx.example.com")
    assert not allowed(number, []) and not allowed(uri, [])
    assert allowed(number, ["+4930"]) and allowed(number, ["+4930123*"]) and not allowed(number, ["+4940"])
    assert not allowed(number, ["sip:*"])  # a URI pattern never allows a number
    assert allowed(uri, ["sip:*@pbx.example.com"]) and allowed(uri, ["SIP:SALES@PBX.EXAMPLE.COM"])
    assert not allowed(uri, ["sip:*@pbx.example.co"]) and not allowed(uri, ["+49"])
    assert not allowed(parse_target("sip:x@pbx.example.com.evil.test"), ["sip:*@pbx.example.com"])
    assert not allowed(parse_target("sip:a.b@x"), ["sip:a?b@x"])  # ? and [] are literal, not wildcards
    assert allowed(number, ["*"]) and allowed(uri, ["*"])


def test_config_refuses_patterns_that_are_neither_kind():
    check_pattern("+49 30")
    with pytest.raises(ValueError):
        check_pattern("49-thirty")
    with pytest.raises(ValidationError, match="neither a number prefix"):
        ServerConfig.model_validate({"outbound": {"allowed_to": ["pbx.example.com"]}})


@pytest.mark.parametrize("status,state", [(486, DialState.BUSY), (600, DialState.BUSY), (603, DialState.DECLINED),
                                          (408, DialState.NO_ANSWER), (480, DialState.NO_ANSWER),
                                          (404, DialState.FAILED), (503, DialState.FAILED), (500, DialState.FAILED)])
def test_final_answers_map_to_states(status, state):
    assert final_state(status) is state


def test_outbound_fails_closed_without_the_ops_token_or_sip():
    base = {"sip": {"enabled": True}, "ops": {"port": 9100}, "outbound": {"enabled": True}}
    problems = errors(ServerConfig.model_validate(base), env={})
    assert any("outbound.enabled" in p and "ops.token_env" in p for p in problems), problems
    with_token = {**base, "ops": {"port": 9100, "token_env": "OPS_TOKEN"}}
    assert not [p for p in errors(ServerConfig.model_validate(with_token), env={"OPS_TOKEN": "t" * 40})
                if "outbound" in p]
    no_sip = {**with_token, "sip": {"enabled": False}}
    assert any("sip.enabled" in p for p in errors(ServerConfig.model_validate(no_sip), env={"OPS_TOKEN": "t" * 40}))
    assert not ServerConfig().outbound.enabled


def _fed(det, pcm: np.ndarray, packet: int = 320):
    for i in range(0, len(pcm), packet):
        det.feed(pcm[i:i + packet])
    return det.close()


def _tone(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _silence(seconds: float, rate: int = 16000) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)


def test_a_short_word_then_silence_is_a_person():
    det = MachineDetector(16000)
    assert _fed(det, np.concatenate([_silence(0.4), _tone(0.6), _silence(2)])) is Verdict.HUMAN
    assert det.decided_at == pytest.approx(1.6, abs=0.05)  # the word's end plus the pause


def test_a_long_greeting_with_short_pauses_is_a_machine_as_soon_as_it_is_long():
    greeting = np.concatenate([_tone(0.9), _silence(0.3), _tone(0.9), _silence(0.3), _tone(3)])
    det = MachineDetector(16000)
    assert _fed(det, np.concatenate([_silence(0.3), greeting])) is Verdict.MACHINE
    assert det.decided_at == pytest.approx(2.3, abs=0.05)


def test_silence_or_quiet_noise_is_unknown():
    assert _fed(MachineDetector(16000), _silence(6)) is Verdict.UNKNOWN
    noise = np.random.default_rng(0).normal(0, 10 ** (-55 / 20), 16000 * 6).astype(np.float32)
    assert _fed(MachineDetector(16000), noise) is Verdict.UNKNOWN
    assert MachineDetector(16000).close() is Verdict.UNKNOWN  # hung up before a word


def test_line_noise_above_the_speech_level_is_the_floor_not_a_greeting():
    rng = np.random.default_rng(1)
    word = np.concatenate([_silence(0.4), _tone(0.6), _silence(2.5)])
    noisy = word + rng.normal(0, 10 ** (-32 / 20), len(word)).astype(np.float32)
    assert _fed(MachineDetector(16000), noisy) is Verdict.HUMAN


def test_a_greetings_words_decide_machine_while_the_audio_has_not():
    det = MachineDetector(16000)
    det.feed(np.concatenate([_silence(0.3), _tone(1.2)]))  # talking, not long enough to say machine
    assert det.verdict is None
    for piece in (" Hi", ",", " you", "'ve", " reached", " Mark", ".", " Please", " leave", " a", " mess", "age"):
        det.hear(piece)
    assert det.verdict is Verdict.MACHINE and det.by_words
    assert det.decided_at == pytest.approx(1.5, abs=0.05)  # on the audio's clock


@pytest.mark.parametrize("words", [" Hello?", " Yes, who is this?", " Hi, I'm not sure, leave it", " Tone? What tone",
                                   " I can't take a message"])
def test_a_persons_words_decide_nothing(words):
    det = MachineDetector(16000)
    det.feed(_tone(0.5))
    assert det.hear(words) is None and not det.by_words
    assert _fed(det, _silence(1.0)) is Verdict.HUMAN  # the pause does


def test_words_after_the_verdict_change_nothing():
    det = MachineDetector(16000)
    assert _fed(det, np.concatenate([_tone(0.6), _silence(1.0)])) is Verdict.HUMAN
    assert det.hear(" please leave a message after the tone") is Verdict.HUMAN and not det.by_words
