"""Which weights a server loads (server/model_choice.py): the rule alone, nothing loaded."""

from __future__ import annotations

import pytest

from server.model_choice import choose_model


def never_asked() -> str | None:
    raise AssertionError("the Hub was consulted where the answer cannot matter")


@pytest.mark.parametrize("source, has_dir, cuda, load, not_realtime", [
    ("demo", False, True, "demo", False),
    ("dir", True, False, "dir", False),
    ("auto", True, True, "dir", False),  # a named folder wins
    ("auto", True, False, "dir", False),
    ("hf", False, True, "hf", False),
    ("hf", False, False, "hf", True),  # explicit: loads on CPU, warned
])
def test_explicit_choices_never_ask_the_hub(source, has_dir, cuda, load, not_realtime):
    choice = choose_model(source, has_dir, cuda, never_asked)
    assert (choice.load, choice.not_realtime) == (load, not_realtime)
    assert (choice.note is not None) == not_realtime  # only the CPU 7B says something


def test_auto_on_a_cpu_only_machine_serves_the_demo_model_and_says_why():
    choice = choose_model("auto", False, False, never_asked)  # even with weights and a token
    assert choice.load == "demo" and not choice.not_realtime
    assert "no CUDA" in choice.note and "model.source: hf" in choice.note


def test_auto_with_cuda_takes_the_7b_when_its_weights_can_be_had():
    assert choose_model("auto", False, True, lambda: None).load == "hf"
    missing = choose_model("auto", False, True, lambda: "no PersonaPlex weights in the cache and no HF_TOKEN set")
    assert missing.load == "demo" and missing.note.startswith("no PersonaPlex weights")
