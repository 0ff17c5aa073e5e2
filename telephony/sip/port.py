"""The per-call audio port on pjsua's conference bridge: the bridge's rate, 20 ms frames, in C.

The bridge's clock thread moves each call's frames in and out of two sample rings inside a
small native port (`native/call_port.c`, built by `scripts/build_pjsua2.sh`); the SIP thread
reads what the caller said and queues what the agent says, as many samples at a time as it has,
through ctypes (which releases the interpreter lock). No Python runs on the clock thread: a
pjsua2 `AudioMediaPort` subclassed in Python had the clock call into the interpreter twice per
20 ms per call, the largest share of the media plane's CPU and a contender for the lock the
engine thread needs.

A request of the bridge always gets a full frame (silence when less than a frame is queued,
counted as an underrun); caller samples that find the inbound ring (1 s) full push out the
oldest, counted. Both counters only grow, on the clock thread; the SIP thread reads differences.

Ports are pooled, never removed while the bridge runs: since pjproject 2.14 removing a port
from the conference bridge is queued to the clock thread, so a port freed at call end could
still be called back once more, into freed memory. A port that served a call goes back to the
pool and the next call reuses it; the pool is only as large as the most calls ever up at once,
and its memory is freed after libDestroy.
"""

from __future__ import annotations

import ctypes
import os
import sysconfig
from pathlib import Path

import numpy as np
import pjsua2 as pj  # noqa: F401  (loads _pjsua2, whose pj symbols the port uses)

PTIME_US = 20000
LIBRARY = "personaplex_call_port.so"  # beside pjsua2 in the virtualenv (build_pjsua2.sh)


class CallPortUnavailable(RuntimeError):
    pass


def bridge_rate(codecs: list[str]) -> int:
    """The conference bridge's clock rate for the codecs the endpoint offers ("PCMU/8000",
    "G722/16000", "opus/48000"): the highest of them, at most 16 kHz (the model's audio is
    resampled to 24 kHz at the leg either way). The bridge resamples every call whose codec runs
    at another rate, both ways, on its clock thread (libsamplerate: most of that thread's time,
    bench_media), so an endpoint offering only G.711 runs it at 8 kHz and resamples nothing;
    one offering a wideband codec keeps 16 kHz so that wideband calls stay wideband."""
    rates = [int(r) for r in (c.rsplit("/", 1)[-1] for c in codecs if "/" in c) if r.isdigit() and int(r) >= 8000]
    return min(max(rates), 16000) if rates else 16000


def _library() -> ctypes.CDLL:
    import _pjsua2

    path = Path(sysconfig.get_paths()["platlib"]) / LIBRARY
    if not path.exists():
        raise CallPortUnavailable(f"the SIP call port is not built ({path} is missing): run scripts/setup.sh")
    # the port's pj symbols resolve to pjsua2's own (one pjsua state, one bridge): make them global
    ctypes.CDLL(_pjsua2.__file__, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:  # e.g. a pjsua2 built with hidden symbols, or one the port was not built for
        raise CallPortUnavailable(f"the SIP call port does not load ({exc}): run scripts/setup.sh") from None
    vp, u, i16p = ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p
    sig = {
        "cp_create": (vp, [ctypes.c_char_p, u, u, u, u, ctypes.POINTER(ctypes.c_int)]),
        "cp_slot": (ctypes.c_int, [vp]),
        "cp_connect": (ctypes.c_int, [vp, ctypes.c_int]),
        "cp_read": (u, [vp, i16p, u]),
        "cp_write": (u, [vp, i16p, u]),
        "cp_queued": (u, [vp]),
        "cp_clear": (ctypes.c_int, [vp, ctypes.c_int]),
        "cp_counters": (None, [vp, ctypes.POINTER(ctypes.c_uint64)]),
        "cp_tap": (None, [vp, ctypes.c_double]),
        "cp_tap_read": (u, [vp, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_double), u]),
        "cp_free": (None, [vp]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _library()
    return _lib


class CallAudioPort:
    """One call's rings on the bridge. Every method is for the SIP thread (connect is pjsua's API;
    the rest only take the port's own mutex, shared with the clock thread)."""

    def __init__(self, name: str, rate: int):
        self._lib = lib()
        self.rate = rate
        self.samples = rate * PTIME_US // 1_000_000  # one 20 ms frame of the bridge
        self._capacity = rate  # 1 s of caller audio: the SIP thread reads every 10 ms
        status = ctypes.c_int(0)
        self._p = self._lib.cp_create(name.encode(), rate, self.samples, self._capacity, rate // 2,
                                      ctypes.byref(status))
        if not self._p:
            raise CallPortUnavailable(f"pjsua refused the call port {name} (pj status {status.value})")
        self.slot: int = self._lib.cp_slot(self._p)
        self._in = np.empty(self._capacity, dtype="<i2")
        self._in_ptr = self._in.ctypes.data
        self._counters = (ctypes.c_uint64 * 3)()

    def connect(self, call_slot: int) -> None:
        """The call's audio to this port and back (its stream's conference slot)."""
        status = self._lib.cp_connect(self._p, call_slot)
        if status != 0:
            raise CallPortUnavailable(f"pjsua could not connect call slot {call_slot} (pj status {status})")

    def read(self) -> np.ndarray | None:
        """The caller's samples since the last read, as float32 in [-1, 1) (None: nothing new)."""
        n = self._lib.cp_read(self._p, self._in_ptr, self._capacity)
        if not n:
            return None
        return np.multiply(self._in[:n], 1.0 / 32768.0, dtype=np.float32)

    def write(self, pcm: np.ndarray) -> int:
        """Queue agent samples (float, clipped to int16); returns how many the ring took."""
        data = np.ascontiguousarray((np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2"))
        return self._lib.cp_write(self._p, data.ctypes.data, len(data))

    def queued(self) -> int:
        """Agent samples queued and not yet sent."""
        return self._lib.cp_queued(self._p)

    def drop_agent_audio(self) -> int:
        """A barge-in: what the caller was about to hear goes (returns how many samples)."""
        return self._lib.cp_clear(self._p, 2)

    def drop_caller_audio(self) -> None:
        self._lib.cp_clear(self._p, 1)

    def reset(self) -> None:
        """Ready for the next call (the bridge may still call in, so only clear)."""
        self._lib.cp_clear(self._p, 3)

    def counters(self) -> tuple[int, int, int]:
        """(underrun frames, caller samples pushed out of the full ring, caller frames received)."""
        self._lib.cp_counters(self._p, self._counters)
        c = self._counters
        return int(c[0]), int(c[1]), int(c[2])

    def tap(self, rms: float) -> None:
        """Record when what is sent turns louder or quieter than `rms` (0: off). Benchmarks and
        the test server time transports by it, at the moment the clock thread sends."""
        self._lib.cp_tap(self._p, rms)

    def tap_events(self) -> list[tuple[bool, float]]:
        """(loud, wall-clock time) of each change since the last call."""
        loud, when = (ctypes.c_int * 64)(), (ctypes.c_double * 64)()
        n = self._lib.cp_tap_read(self._p, loud, when, 64)
        return [(bool(loud[i]), when[i]) for i in range(n)]

    def free(self) -> None:
        """Only after libDestroy: the bridge no longer knows the port."""
        if self._p:
            self._lib.cp_free(self._p)
            self._p = None


class PortPool:
    """Call audio ports, reused across calls (see the module docstring for why)."""

    def __init__(self, rate: int):
        self.rate = rate
        self.samples = rate * PTIME_US // 1_000_000  # one 20 ms frame of the bridge (and of a port)
        self._free: list[CallAudioPort] = []
        self._all: list[CallAudioPort] = []

    def check(self) -> None:
        """Load the port library now (the endpoint's start), so a missing or stale build stops
        the start with its reason instead of failing the first call."""
        lib()

    def acquire(self) -> CallAudioPort:
        if self._free:
            port = self._free.pop()
            port.reset()
            return port
        port = CallAudioPort(f"agent{len(self._all)}", self.rate)
        self._all.append(port)
        return port

    def release(self, port: CallAudioPort) -> None:
        port.reset()
        if port not in self._free:
            self._free.append(port)

    def destroy(self) -> None:
        """Only after libDestroy (the SIP endpoint's shutdown): frees every port's memory."""
        for port in self._all:
            port.free()
        self._free.clear()
        self._all.clear()
