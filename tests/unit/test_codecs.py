"""G.711 u-law and L16 conversions (telephony.audio.codecs), checked against FFmpeg's codec (PyAV)."""

from __future__ import annotations

import time
import warnings

import av
import numpy as np
import pytest

from telephony.audio.codecs import (MULAW_DECODE_INT16, float_to_int16, l16_decode, l16_encode,
                              mulaw_decode, mulaw_encode)


def _ffmpeg_mulaw_decode(data: bytes) -> np.ndarray:
    ctx = av.CodecContext.create("pcm_mulaw", "r")
    ctx.sample_rate = 8000
    ctx.layout = "mono"
    frames = ctx.decode(av.Packet(data))
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])


def _ffmpeg_mulaw_encode(samples: np.ndarray) -> bytes:
    ctx = av.CodecContext.create("pcm_mulaw", "w")
    ctx.sample_rate, ctx.format, ctx.layout = 8000, "s16", "mono"
    ctx.open()
    frame = av.AudioFrame.from_ndarray(samples.astype(np.int16)[None, :], format="s16", layout="mono")
    frame.sample_rate = 8000
    return b"".join(bytes(p) for p in ctx.encode(frame)) + b"".join(bytes(p) for p in ctx.encode(None))


def _sine(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = ref.astype(np.float64) - got.astype(np.float64)
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum(noise ** 2))


def test_mulaw_decode_matches_ffmpeg_for_every_code():
    codes = bytes(range(256))
    assert np.array_equal(MULAW_DECODE_INT16, _ffmpeg_mulaw_decode(codes))
    assert np.array_equal(mulaw_decode(codes), _ffmpeg_mulaw_decode(codes).astype(np.float32) / 32768)
    assert mulaw_decode(codes).dtype == np.float32


def test_mulaw_encode_agrees_with_ffmpeg_within_one_step():
    samples = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    ours = np.frombuffer(mulaw_encode(samples.astype(np.float32) / 32768), np.uint8)
    theirs = np.frombuffer(_ffmpeg_mulaw_encode(samples), np.uint8)
    assert len(ours) == len(theirs) == 65536
    differ = ours != theirs
    assert differ.mean() < 0.02  # only at segment edges (rounding), never elsewhere
    # Where they differ, both codes decode to neighbouring levels around the sample.
    dec_ours = MULAW_DECODE_INT16[ours[differ]].astype(np.int32)
    dec_theirs = MULAW_DECODE_INT16[theirs[differ]].astype(np.int32)
    x = samples[differ].astype(np.int32)
    assert np.all(np.abs(ours[differ].astype(int) - theirs[differ].astype(int)) == 1)
    assert np.all(np.minimum(dec_ours, dec_theirs) <= x + 1) and np.all(np.maximum(dec_ours, dec_theirs) >= x - 1)


def test_mulaw_codes_survive_decode_then_encode():
    codes = np.arange(256, dtype=np.uint8)
    again = np.frombuffer(mulaw_encode(mulaw_decode(codes.tobytes())), np.uint8)
    keep = codes != 0x7F  # 0x7F and 0xFF are both zero; zero encodes as 0xFF
    assert np.array_equal(again[keep], codes[keep])
    assert again[0x7F] == 0xFF


def test_mulaw_sine_round_trip_within_g711_quality():
    sine = _sine(440, 1.0, 8000)
    data = mulaw_encode(sine)
    assert len(data) == len(sine) == 8000  # one byte per sample: 160 bytes per 20 ms
    back = mulaw_decode(data)
    assert back.dtype == np.float32 and back.shape == sine.shape
    assert _snr_db(sine, back) > 30  # G.711 u-law is ~38 dB on a loud tone
    assert np.max(np.abs(back - sine)) <= 512 / 32768 + 1e-6  # half the top segment's step


def test_mulaw_clips_and_survives_nan():
    data = mulaw_encode(np.array([2.0, -2.0, np.nan, np.inf, -np.inf, 0.0], np.float32))
    back = mulaw_decode(data)
    assert back[0] > 0.97 and back[1] < -0.97 and back[2] == 0.0 and back[3] > 0.97 and back[4] < -0.97
    assert mulaw_encode(np.zeros(0, np.float32)) == b""


@pytest.mark.parametrize("order", ["big", "little"])
def test_l16_round_trip_is_exact(order):
    ints = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    pcm = ints.astype(np.float32) / 32768
    data = l16_encode(pcm, byteorder=order)
    assert len(data) == 2 * len(ints)
    back = l16_decode(data, byteorder=order)
    assert back.dtype == np.float32 and np.array_equal(back, pcm)
    assert l16_encode(back, byteorder=order) == data


def test_l16_byte_order_on_the_wire():
    pcm = np.array([0x0102, -2], np.int16).astype(np.float32) / 32768
    assert l16_encode(pcm, byteorder="big") == b"\x01\x02\xff\xfe"
    assert l16_encode(pcm, byteorder="little") == b"\x02\x01\xfe\xff"
    assert np.array_equal(l16_decode(b"\x01\x02", byteorder="big"), np.array([0x0102 / 32768], np.float32))


def test_l16_refuses_odd_lengths_and_unknown_orders():
    with pytest.raises(ValueError, match="odd"):
        l16_decode(b"\x00\x01\x02", byteorder="big")
    with pytest.raises(ValueError):
        l16_encode(np.zeros(2, np.float32), byteorder="middle")  # type: ignore[arg-type]


def test_float_to_int16_rounds_and_clips():
    assert float_to_int16(np.array([1.0, -1.0, 0.5, 1.5 / 32768], np.float32)).tolist() == [32767, -32768, 16384, 2]
    # what a broken model frame may hold: NaN is silence, infinities and overs the full scale,
    # decided here rather than by a NaN cast (platform-defined, and a RuntimeWarning in the log
    # for every packet)
    odd = np.array([np.nan, np.inf, -np.inf, 3.0, -3.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float_to_int16(odd).tolist() == [0, 32767, -32768, 32767, -32768]


def test_codecs_are_cheap_enough_for_every_packet():
    frame = _sine(300, 0.02, 8000)
    wide = _sine(300, 0.02, 16000)
    start = time.perf_counter()
    for _ in range(2000):
        mulaw_decode(mulaw_encode(frame))
        l16_decode(l16_encode(wide, byteorder="big"), byteorder="big")
    per_packet = (time.perf_counter() - start) / 2000
    assert per_packet < 1e-3  # ~20 us here; 1 ms leaves room for a loaded CI machine
