"""Voices shipped as `voices.tgz` (the Hugging Face repo's layout): a model folder with the
archive instead of `voices/` loads and speaks with its voices; a hostile archive writes nothing
outside the voices folder."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from agent.model.files import LM_FILE, MIMI_FILE, TEXT_TOKENIZER_FILE, VOICES_ARCHIVE, local_model_files
from agent.model.voices import STOCK_VOICES, available_voices


def model_folder(demo_dir: Path, root: Path) -> Path:
    """The demo model's files in `root`, without a voices/ folder (links: the weights are big)."""
    root.mkdir(parents=True)
    for name in (LM_FILE, MIMI_FILE, TEXT_TOKENIZER_FILE, "personaplex_arch.json"):
        os.symlink(demo_dir / name, root / name)
    return root


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes, **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def test_model_folder_with_voices_tgz_loads_and_speaks(demo_dir, tmp_path):
    from agent.model.engine import Engine
    from agent.model.loader import load_model
    from agent.model.sampling import SamplingParams
    from tests.support import speechlike

    root = model_folder(demo_dir, tmp_path / "model")
    with tarfile.open(root / VOICES_ARCHIVE, "w:gz") as tar:  # as the HF repo packs them: voices/NAME.pt
        for v in STOCK_VOICES:
            tar.add(demo_dir / "voices" / f"{v}.pt", arcname=f"voices/{v}.pt")
    assert not (root / "voices").exists()
    files = local_model_files(root)
    assert files.voices_dir == root / "voices"
    assert available_voices(files.voices_dir) == sorted(STOCK_VOICES)
    for v in ("NATF2", "VARM4"):  # the unpacked bytes are the packed ones
        assert (files.voices_dir / f"{v}.pt").read_bytes() == (demo_dir / "voices" / f"{v}.pt").read_bytes()
    assert local_model_files(root).voices_dir == files.voices_dir  # unpacked once, found again
    # a call on a voice from the archive gives the same frames as on the demo model's own voices/
    outs = []
    for model_dir in (root, demo_dir):
        model = load_model(local_model_files(model_dir), device="cpu")
        with Engine(model, 1) as eng:
            eng.start(0, eng.schedule("NATM1", "Hello there."), SamplingParams(greedy=True))
            frames = [eng.run_prompt(0)] + [eng.step({0: speechlike(0.08, k)})[0] for k in range(3)]
            outs.append(np.stack([f.tokens for f in frames]))
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("hostile", [
    "../escaped.pt",  # relative, climbing out
    "voices/../../escaped.pt",
    "/ABSOLUTE/escaped.pt",  # absolute (made to point into this test's folder below)
])
def test_voices_tgz_members_cannot_write_outside_the_voices_folder(demo_dir, tmp_path, hostile):
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile = hostile.replace("/ABSOLUTE", str(outside))
    root = model_folder(demo_dir, tmp_path / "models" / "m")
    good = (demo_dir / "voices" / "NATF0.pt").read_bytes()
    with tarfile.open(root / VOICES_ARCHIVE, "w:gz") as tar:
        add_bytes(tar, "voices/NATF0.pt", good)
        add_bytes(tar, hostile, b"not a voice")
        # links are never followed nor made: one to a file outside, one to a directory outside
        add_bytes(tar, "voices/LINKED.pt", b"", type=tarfile.SYMTYPE, linkname=str(outside / "target.pt"))
        add_bytes(tar, "voices/HARD.pt", b"", type=tarfile.LNKTYPE, linkname="../../outside/target.pt")
        add_bytes(tar, "voices/dir", b"", type=tarfile.SYMTYPE, linkname=str(outside))
        add_bytes(tar, "voices/dir/THROUGH.pt", b"through a link")
    (outside / "target.pt").write_bytes(b"outside, untouched")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}

    files = local_model_files(root)

    voices = files.voices_dir
    assert voices == root / "voices" and voices.is_dir()
    written = {p for p in tmp_path.rglob("*") if (p.is_file() or p.is_symlink()) and p not in before}
    written -= {p for p in root.iterdir() if p.is_symlink()}  # the model's own links, made above
    outside_voices = [p for p in written if voices not in p.parents]
    assert outside_voices == [], outside_voices  # nothing anywhere but in voices/
    assert not [p for p in voices.rglob("*") if p.is_symlink()]  # no link was made
    assert (outside / "target.pt").read_bytes() == b"outside, untouched"
    assert not list(outside.glob("*escaped*")) and not (tmp_path / "models" / "escaped.pt").exists()
    assert {p: p.read_bytes() for p in before} == before  # nothing that was there changed
    assert (voices / "NATF0.pt").read_bytes() == good  # the good member is there
    assert "NATF0" in available_voices(voices)
