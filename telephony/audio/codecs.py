"""Sample codecs of carrier media streams: G.711 u-law and 16-bit linear PCM (L16).

Everything here converts between wire bytes and float32 mono numpy arrays in [-1, 1], the
form the rest of the system speaks. It runs for every 20 ms packet of every call, so it is
table-driven and vectorised: u-law decode is one 256-entry lookup, u-law encode one 65536-entry
lookup on the int16 sample (no per-sample Python, no `audioop`, which Python 3.13 removed).

u-law follows ITU-T G.711 (the segment/mantissa reference algorithm with bias 0x84 and clip
32635). Decoding matches FFmpeg's `pcm_mulaw` (PyAV) exactly for all 256 codes; encoding is
the reference algorithm, which may differ from FFmpeg's rounding by one code step at segment
edges (both are valid G.711; tests bound the difference).

L16 byte order is a parameter, never implied. RFC 3551 section 4.5.11 defines the RTP L16
payload as network byte order (big-endian), and Telnyx media streaming carries "base64-encoded
RTP payloads (no headers)", so `telephony.streams.telnyx` uses big-endian; WAV files and most AI audio
APIs are little-endian. Getting it wrong turns speech into loud noise, hence no default.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ByteOrder = Literal["big", "little"]

_BIAS = 0x84
_CLIP = 32635


def _mulaw_encode_table() -> np.ndarray:
    """u-law byte for every int16 value, indexed by the value's uint16 bit pattern."""
    x = np.arange(-32768, 32768, dtype=np.int32)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), _CLIP) + _BIAS  # 132 .. 32767
    # Segment = position of the highest set bit above bit 7 (0..7).
    exponent = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
    mantissa = (mag >> (exponent + 3)) & 0x0F
    codes = (~(sign | (exponent << 4) | mantissa)) & 0xFF
    table = np.empty(65536, dtype=np.uint8)
    table[x.astype(np.int16).view(np.uint16)] = codes
    return table


def _mulaw_decode_table() -> np.ndarray:
    """int16 value of every u-law byte."""
    u = (~np.arange(256, dtype=np.int32)) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    mag = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return np.where(u & 0x80, -mag, mag).astype(np.int16)


_MULAW_ENCODE = _mulaw_encode_table()
MULAW_DECODE_INT16 = _mulaw_decode_table()
_MULAW_DECODE_F32 = (MULAW_DECODE_INT16.astype(np.float32) / 32768.0).astype(np.float32)


def float_to_int16(pcm: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16, rounded to nearest and clipped (NaN -> 0, +-inf -> +-1).

    In place on one temporary with plain ufuncs: it runs for every outbound packet of every
    call, and `np.nan_to_num`/`np.clip` cost more interpreter time than the arithmetic."""
    y = np.asarray(pcm, dtype=np.float32).reshape(-1) * np.float32(32768.0)
    np.rint(y, out=y)
    np.maximum(y, -32768, out=y)  # +-inf end up at the bounds; NaN passes through both...
    np.minimum(y, 32767, out=y)
    np.copyto(y, 0.0, where=np.isnan(y))  # ... to here
    return y.astype(np.int16)


def int16_to_float(samples: np.ndarray) -> np.ndarray:
    """int16 -> float32 in [-1, 1) (divide by 32768: the inverse of `float_to_int16`)."""
    return samples.astype(np.float32) / np.float32(32768.0)


def mulaw_decode(data: bytes) -> np.ndarray:
    """G.711 u-law bytes (one sample per byte) -> float32 mono in [-1, 1]."""
    return _MULAW_DECODE_F32[np.frombuffer(data, dtype=np.uint8)]


def mulaw_encode(pcm: np.ndarray) -> bytes:
    """float32 mono in [-1, 1] -> G.711 u-law bytes (one byte per sample)."""
    return _MULAW_ENCODE[float_to_int16(pcm).view(np.uint16)].tobytes()


def _l16_dtype(byteorder: ByteOrder) -> np.dtype:
    if byteorder == "big":
        return np.dtype(">i2")
    if byteorder == "little":
        return np.dtype("<i2")
    raise ValueError(f"L16 byte order must be 'big' or 'little', not {byteorder!r}")


def l16_decode(data: bytes, *, byteorder: ByteOrder) -> np.ndarray:
    """16-bit signed linear PCM bytes -> float32 mono in [-1, 1). Odd lengths are a ValueError
    (a truncated sample means the payload is corrupt, not short)."""
    if len(data) % 2:
        raise ValueError(f"L16 payload has an odd number of bytes ({len(data)})")
    return int16_to_float(np.frombuffer(data, dtype=_l16_dtype(byteorder)))


def l16_encode(pcm: np.ndarray, *, byteorder: ByteOrder) -> bytes:
    """float32 mono in [-1, 1] -> 16-bit signed linear PCM bytes in the given byte order."""
    return float_to_int16(pcm).astype(_l16_dtype(byteorder), copy=False).tobytes()
