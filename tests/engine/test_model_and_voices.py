"""Model files, voices and input handling: clear errors, safe loading, deterministic demo model."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.errors import BadInput, ModelUnavailable, VoiceNotFound
from agent.model.files import hub_model_files, local_model_files
from agent.model.voices import STOCK_VOICES, load_voice_pt, resolve_voice


def test_loading_skips_the_initial_weights_and_leaves_torch_as_it_was(demo_dir):
    """The LM is built without drawing initial weights (its checkpoint replaces them; drawing
    them on the meta device imported torch._dynamo, 1.9 s of every start), and torch's init
    functions are torch's again afterwards."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from agent.model.files import local_model_files\n"
            "from agent.model.loader import load_model\n"
            f"load_model(local_model_files({str(demo_dir)!r}), device='cpu')\n"
            "assert torch.nn.init.normal_.__module__ == 'torch.nn.init', torch.nn.init.normal_\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_demo_model_is_deterministic_and_complete(demo_dir, tmp_path):
    from agent.model.demo import demo_model_dir

    other = demo_model_dir(tmp_path / "again")

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert digest(demo_dir) == digest(other)
    assert sorted(p.stem for p in (demo_dir / "voices").glob("*.pt")) == sorted(STOCK_VOICES)


def test_voice_names_are_never_paths(demo_dir):
    voices = demo_dir / "voices"
    assert resolve_voice("NATF2", voices) == voices / "NATF2.pt"
    assert resolve_voice("NATF2.pt", voices) == voices / "NATF2.pt"
    for hostile in ("../voices/NATF2", "/etc/passwd", "NATF2/../../x", "..", "", "NA TF2"):
        with pytest.raises(VoiceNotFound):
            resolve_voice(hostile, voices)
    with pytest.raises(VoiceNotFound, match="available voices: NATF0, NATF1"):
        resolve_voice("NATF9", voices)


class _Armed:
    """Unpickling this runs code: it creates the file named by its argument."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _armed_voice(path: Path, marker: Path, zip_format: bool) -> Path:
    """A .pt voice file whose pickle would run code, in torch.save's zip format or as a legacy
    raw pickle, with the real voice fields around the payload."""
    state = {"embeddings": _Armed(marker), "cache": torch.zeros(1, 17, 4, dtype=torch.long)}
    if zip_format:
        torch.save(state, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(state, fh)
    return path


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch.save-zip", "raw-pickle"])
def test_voice_pt_is_loaded_without_unpickling_code(tmp_path, zip_format):
    import subprocess
    import sys

    marker = tmp_path / "PWNED"
    bad = _armed_voice(tmp_path / "EVIL.pt", marker, zip_format)
    if zip_format:
        assert bad.read_bytes()[:2] == b"PK"  # torch.save's zip container
        # the payload is live: a plain (unsafe) load runs it (in another process)
        subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(bad)!r}, weights_only=False)"],
                       check=False, capture_output=True, timeout=120)
        assert marker.exists()
        marker.unlink()
    with pytest.raises(BadInput, match="not a PersonaPlex voice prompt"):
        load_voice_pt(bad)
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch.save-zip", "raw-pickle"])
def test_prompt_length_tool_reads_voices_without_unpickling_code(tmp_path, demo_dir, zip_format):
    """`personas check` reads voice files too (their length counts against the prompt): the
    same files, the same refusal, no code run."""
    from agent.personas.tools import voice_steps

    marker = tmp_path / "PWNED"
    voices = tmp_path / "voices"
    voices.mkdir()
    _armed_voice(voices / "EVIL.pt", marker, zip_format)
    assert voice_steps(voices, "EVIL") == 0
    assert voice_steps(None, str(voices / "EVIL.pt")) == 0  # a custom voice given by path
    assert not marker.exists()
    # and a real voice file is read: its embedding steps, plus the step before them
    expected = load_voice_pt(demo_dir / "voices" / "NATF0.pt").prompt_steps
    assert voice_steps(demo_dir / "voices", "NATF0") == expected > 1


def test_missing_model_files_are_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelUnavailable, match="missing tokenizer-e351c8d8-checkpoint125.safetensors, "
                                               "tokenizer_spm_32k_3.model"):
        local_model_files(tmp_path)
    with pytest.raises(ModelUnavailable, match="not a directory"):
        local_model_files(tmp_path / "nope")


def test_hub_without_network_says_so_quickly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailable, match="Cannot reach the Hugging Face Hub"):
        hub_model_files("nvidia/personaplex-7b-v1")


def test_hub_error_messages(monkeypatch):
    from huggingface_hub import errors as hf_errors

    from agent.model.files import _hf_error_message

    class Resp:
        status_code = 401
        headers = {}
        request = None

    monkeypatch.delenv("HF_TOKEN", raising=False)
    gated = hf_errors.GatedRepoError.__new__(hf_errors.GatedRepoError)
    assert "licence" in _hf_error_message("nvidia/personaplex-7b-v1", gated)
    missing = hf_errors.RepositoryNotFoundError.__new__(hf_errors.RepositoryNotFoundError)
    missing.response = Resp()
    assert "set HF_TOKEN" in _hf_error_message("nvidia/personaplex-7b-v1", missing)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    assert "refused HF_TOKEN" in _hf_error_message("nvidia/personaplex-7b-v1", missing)


def test_offline_accepts_any_rate_and_channels(demo_dir, tmp_path):
    import sphn

    from server.cli.main import main

    stereo = np.stack([np.sin(np.arange(44100) / 10), np.cos(np.arange(44100) / 7)]).astype(np.float32) * 0.3
    sphn.write_wav(str(tmp_path / "in.wav"), stereo, 44100)
    rc = main(["offline", "--model-dir", str(demo_dir), "--device", "cpu", "--voice-prompt", "NATM1",
               "--input-wav", str(tmp_path / "in.wav"), "--output-wav", str(tmp_path / "out.wav"), "--seed", "3"])
    assert rc == 0
    out, sr = sphn.read(str(tmp_path / "out.wav"))
    assert sr == 24000 and out.shape == (1, 24000)


def test_offline_bad_inputs_get_one_line(demo_dir, tmp_path, capsys):
    from server.cli.main import main

    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00junkjunkjunk")
    for name, msg in (("empty.wav", "cannot read audio"), ("junk.wav", "cannot read audio"),
                      ("missing.wav", "does not exist")):
        rc = main(["offline", "--model-dir", str(demo_dir), "--device", "cpu", "--voice-prompt", "NATM1",
                   "--input-wav", str(tmp_path / name), "--output-wav", str(tmp_path / "o.wav")])
        assert rc == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err


def test_custom_wav_voice_equals_its_recorded_pt(demo_model, tmp_path):
    """A custom voice given as a wav (encoded each time) and its recorded .pt replay identically."""
    import sphn

    from agent.model.engine import Engine
    from agent.model.sampling import SamplingParams
    from agent.model.voice_record import record_voice_prompt, save_voice_pt
    from tests.support import speechlike

    wav = tmp_path / "me.wav"
    sphn.write_wav(str(wav), speechlike(1.5, 9), 24000)
    with Engine(demo_model, 1) as eng:
        voice = eng.voice(str(wav), allow_paths=True)
        assert voice.codes is not None and voice.codes.shape == (19, 8)
        with pytest.raises(VoiceNotFound):
            eng.voice(str(wav))  # paths only from trusted config
    from agent.personas.tools import voice_steps

    # `personas check` counts the wav's prompt steps as the engine spends them
    assert voice_steps(None, str(wav)) == voice.prompt_steps == 19
    save_voice_pt(record_voice_prompt(demo_model.lm, voice.codes, "me"), tmp_path / "me.pt")
    outs = []
    for spec in (str(wav), str(tmp_path / "me.pt")):
        with Engine(demo_model, 1) as eng:
            eng.start(0, eng.schedule(spec, "Hello there.", allow_voice_paths=True), SamplingParams(greedy=True))
            o = [eng.run_prompt(0)] + [eng.step({0: speechlike(0.08, k)})[0] for k in range(6)]
            outs.append(np.stack([x.tokens for x in o]))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_voices_cli_lists_and_makes(demo_dir, tmp_path, capsys):
    import sphn

    from server.cli.main import main
    from tests.support import speechlike

    assert main(["voices", "list", "--model-dir", str(demo_dir), "--device", "cpu"]) == 0
    assert "NATF2" in capsys.readouterr().out.split()
    sphn.write_wav(str(tmp_path / "me.wav"), speechlike(1.2, 4), 24000)
    assert main(["voices", "make", "--model-dir", str(demo_dir), "--device", "cpu",
                 str(tmp_path / "me.wav"), str(tmp_path / "me.pt")]) == 0
    voice = load_voice_pt(tmp_path / "me.pt")
    assert voice.embeddings.shape[0] == 14 and voice.cache.shape == (17, 4)
