"""`personas check` with a real tokenizer and voice file (the demo model's): prompt-length limits
need a model folder (its tokenizer, its voices: torch), so these live
with the engine layer, not tests/unit."""

from __future__ import annotations

import shutil

from agent.model.voices import STOCK_VOICES
from agent.personas import load_persona_dir
from tests.support.personas import OMAR
from tests.unit.test_personas import SHIPPED, _long_service


def test_prompt_length_limit_with_a_real_tokenizer_and_voice(demo_dir, tmp_path, capsys):
    """The limit `personas check` applies, with the demo model's sentencepiece tokenizer and
    voice file: a prompt fits when its whole prompt phase (as the engine builds it: voice,
    silences, the tokens) leaves at least one step of the context for the call itself."""
    from server.cli.main import main
    from agent.personas.tools import find_tokenizer
    from agent.model.prompt import build_schedule, tokenize_prompt
    from agent.model.voices import load_voice_pt

    (tmp_path / "long.yaml").write_text(_long_service(40))
    prompt = load_persona_dir(tmp_path, STOCK_VOICES).route("1").prompt
    tokens = tokenize_prompt(find_tokenizer(demo_dir), prompt)
    assert len(tokens) > len(prompt.split())  # counted by the tokenizer, not by words
    phase = build_schedule(load_voice_pt(demo_dir / "voices" / "NATF0.pt"), tokens).steps
    check = ["personas", "check", str(tmp_path), "--model-dir", str(demo_dir), "--context"]
    assert main([*check, str(phase + 1)]) == 0  # one step left for the call: fits
    out = capsys.readouterr().out
    assert "ok: 1 personas" in out and "NOT checked" not in out
    assert main([*check, str(phase)]) == 1  # no step left: too long, by exactly one token
    err = capsys.readouterr().err
    assert f"long.yaml:7: the rendered prompt is {len(tokens)} tokens; the model's context allows at most " \
           f"{len(tokens) - 1} for this voice" in err, err


def test_cli_check_says_when_it_cannot_check_prompt_lengths(demo_dir, tmp_path, capsys, monkeypatch):
    """Without a tokenizer (no --model-dir, no weights in the Hugging Face cache) `personas
    check` cannot count tokens: it says so, and a prompt far too long passes unnoticed."""
    import huggingface_hub.constants

    from server.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "long.yaml").write_text(_long_service(600))  # over 3000 tokens
    assert main(["personas", "check", str(personas)]) == 0
    out = capsys.readouterr().out
    assert "note: prompt lengths NOT checked: no tokenizer found" in out and "--model-dir" in out
    assert main(["personas", "check", str(personas), "--model-dir", str(demo_dir)]) == 1
    captured = capsys.readouterr()
    assert "NOT checked" not in captured.out and "tokens; the model's context allows" in captured.err


def test_personas_check_and_show_on_the_command_line(tmp_path, capsys):
    from server.cli.main import main

    (tmp_path / "omar.yaml").write_text(OMAR)
    assert main(["personas", "show", "2040", "--dir", str(tmp_path), "--var", "customer_name=Omar Torres"]) == 0
    out = capsys.readouterr().out
    assert "Verify customer name Omar Torres." in out and "Upcoming pickup" not in out
    assert "customer_name=Omar Torres" in out and "next_pickup=(unknown)" in out
    (tmp_path / "bad.yaml").write_text(OMAR.replace('"2040"', '"2041"').replace("{next_pickup}", "{next_pick"))
    assert main(["personas", "check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml:12: information: item 2: malformed placeholder" in err


def test_cli_show_counts_tokens_with_a_model_tokenizer(golden_dir, tmp_path, capsys):
    from server.cli.main import main

    shutil.copy(SHIPPED / "citysan.yaml", tmp_path / "citysan.yaml")
    (tmp_path / "citysan.yaml").write_text((tmp_path / "citysan.yaml").read_text().replace("NATF2", "TINY0"))
    assert main(["personas", "show", "1001", "--dir", str(tmp_path), "--model-dir", str(golden_dir)]) == 0
    out = capsys.readouterr().out
    assert "tokens:  " in out and int(out.split("tokens:  ")[1].split()[0]) > 50
