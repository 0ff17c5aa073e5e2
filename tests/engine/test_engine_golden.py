"""The engine reproduces the PersonaPlex reference on the golden tiny model.

Alignment checked here: the engine consumes a caller frame in the step it arrives (as upstream
moshi's LMGen), the reference one step later. So the engine's live output i equals golden row
i+1, and the frame the engine emits at the end of its prompt phase equals golden row 0.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
from safetensors.torch import load_file, save_file

from agent.model.engine import Engine
from agent.model.files import local_model_files
from agent.model.loader import count_depformer_sets, load_model, slice_depformer
from agent.model.sampling import SamplingParams
from tests.support import frames_of

GREEDY = SamplingParams(greedy=True)


def run_golden(model, golden, pcm, sampling=GREEDY, seed=None):
    with Engine(model, 1) as eng:
        eng.start(0, eng.schedule("TINY0", golden["text_prompt"]), sampling, seed=seed)
        assert eng.generator.slots[0].schedule.steps == golden["prompt_phase_steps"]
        outs = [eng.run_prompt(0)]
        for f in frames_of(pcm):
            outs.append(eng.step({0: f})[0])
    return outs


def test_text_prompt_tokens(golden_model, golden):
    from agent.model.prompt import tokenize_prompt, wrap_system_prompt

    assert wrap_system_prompt(golden["text_prompt"]) == golden["text_prompt_wrapped"]
    assert tokenize_prompt(golden_model.text_tokenizer, golden["text_prompt"]) == golden["text_prompt_tokens"]


def test_golden_greedy_tokens_codes_and_pcm(golden_model, golden, golden_dir, golden_input):
    outs = run_golden(golden_model, golden, golden_input)
    expected = np.load(golden_dir / "expected_tokens_greedy.npy")
    codes = np.load(golden_dir / "expected_user_codes.npy")
    n = len(expected)
    # caller codes: Mimi encoding of each input frame, exactly
    live_codes = np.stack([o.tokens[9:] for o in outs[1:]])
    np.testing.assert_array_equal(live_codes, codes)
    # first frame (end of prompt phase) == golden row 0; live i == golden row i+1
    got = np.stack([o.tokens for o in outs[:n]])
    np.testing.assert_array_equal(got, expected)
    assert outs[0].first and not outs[1].first
    pcm = np.concatenate([o.pcm for o in outs[:n]])
    np.testing.assert_allclose(pcm, np.load(golden_dir / "expected_pcm_greedy.npy"), atol=1e-5, rtol=0)
    labels = [o.text or {3: "PAD", 0: "EPAD"}.get(o.text_token) for o in outs[:n]]
    assert labels == golden["expected_text_pieces_greedy"]


def test_offline_cli_reproduces_golden(golden_dir, golden, tmp_path):
    from server.cli.main import main

    rc = main(["--log-format", "json", "offline", "--model-dir", str(golden_dir), "--device", "cpu",
               "--voice-prompt", "TINY0", "--text-prompt", golden["text_prompt"], "--greedy",
               "--input-wav", str(golden_dir / "input.wav"), "--output-wav", str(tmp_path / "out.wav"),
               "--output-text", str(tmp_path / "out.json"), "--tokens-out", str(tmp_path / "tok.npy")])
    assert rc == 0
    np.testing.assert_array_equal(np.load(tmp_path / "tok.npy"), np.load(golden_dir / "expected_tokens_greedy.npy"))
    assert json.loads((tmp_path / "out.json").read_text()) == golden["expected_text_pieces_greedy"]
    import sphn

    pcm, sr = sphn.read(str(tmp_path / "out.wav"))
    inp, _ = sphn.read(str(golden_dir / "input.wav"))
    assert sr == 24000 and pcm.shape[-1] == inp.shape[-1]


def test_checkpoint_with_8_depformer_sets_loads_and_matches(golden_dir, golden, golden_input, tmp_path):
    """The 7B checkpoint likely ships 8 depformer sets, the golden one 16: both layouts load."""
    state = load_file(str(golden_dir / "model.safetensors"))
    assert count_depformer_sets(state) == 16
    sliced = slice_depformer(state, 8)
    assert count_depformer_sets(sliced) == 8
    model_dir = tmp_path / "m8"
    model_dir.mkdir()
    save_file(sliced, str(model_dir / "model.safetensors"))
    for name in ("tokenizer-e351c8d8-checkpoint125.safetensors", "tokenizer_spm_32k_3.model",
                 "personaplex_arch.json"):
        shutil.copy(golden_dir / name, model_dir / name)
    shutil.copytree(golden_dir / "voices", model_dir / "voices")
    model8 = load_model(local_model_files(model_dir), device="cpu")
    outs = run_golden(model8, golden, golden_input)
    expected = np.load(golden_dir / "expected_tokens_greedy.npy")
    np.testing.assert_array_equal(np.stack([o.tokens for o in outs[: len(expected)]]), expected)


def test_sampled_run_is_reproducible_and_seed_dependent(golden_model, golden, golden_input):
    s = SamplingParams(temp_audio=0.8, temp_text=0.7, topk_audio=250, topk_text=25)
    a = run_golden(golden_model, golden, golden_input[:24000], s, seed=7)
    b = run_golden(golden_model, golden, golden_input[:24000], s, seed=7)
    c = run_golden(golden_model, golden, golden_input[:24000], s, seed=8)
    ta, tb, tc = (np.stack([o.tokens for o in x]) for x in (a, b, c))
    np.testing.assert_array_equal(ta, tb)
    assert not np.array_equal(ta[:, :9], tc[:, :9])
    # the forced first frame and the caller's codes do not depend on sampling
    np.testing.assert_array_equal(ta[0], tc[0])
    np.testing.assert_array_equal(ta[1:, 9:], tc[1:, 9:])


def test_cpu_offload_reproduces_golden(golden_dir, golden, golden_input):
    """--cpu-offload (weights of the transformer layers in host memory, loaded per layer) changes
    where weights live, not what the model computes. Checked with CPU as the execution device."""
    model = load_model(local_model_files(golden_dir), device="cpu", cpu_offload=True)
    assert any(p.device.type == "meta" for n, p in model.lm.named_parameters() if n.startswith("transformer."))
    outs = run_golden(model, golden, golden_input)
    expected = np.load(golden_dir / "expected_tokens_greedy.npy")
    np.testing.assert_array_equal(np.stack([o.tokens for o in outs[: len(expected)]]), expected)
