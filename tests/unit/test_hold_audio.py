"""Hold audio: the built-in chime and a file, looped per call at the transport's rate."""

from __future__ import annotations

import numpy as np
import pytest

from agent.errors import BadInput
from telephony.audio.hold import HoldAudio


def test_the_builtin_chime_is_soft_and_loops_without_a_gap():
    player = HoldAudio.load(None).player(16000, 320)
    pcm = np.concatenate([player.take_packet() for _ in range(2 * 200)])  # 8 s: two periods
    assert 0.02 < np.abs(pcm).max() <= 0.1
    period = 4 * 16000
    assert np.allclose(pcm[:period], pcm[period:2 * period], atol=1e-6)


def test_a_file_plays_from_its_start_for_each_call_and_a_missing_one_is_an_error(tmp_path):
    import sphn

    tone = (0.3 * np.sin(2 * np.pi * 1000 * np.arange(8000) / 8000)).astype(np.float32)
    path = tmp_path / "hold.wav"
    sphn.write_wav(str(path), tone[None], 8000)
    hold = HoldAudio.load(path)
    first, second = hold.player(8000, 160), hold.player(8000, 160)
    a = np.concatenate([first.take_packet() for _ in range(60)])  # 1.2 s of a 1 s file: loops
    b = second.take_packet()
    assert np.allclose(a[:160], b, atol=0.02) and len(a) == 9600
    assert np.allclose(a[8000:8160], a[:160], atol=0.02)
    with pytest.raises(BadInput):
        HoldAudio.load(tmp_path / "missing.ogg")
