"""A caller's RTP port in a test: receives what the agent sends and notes when each packet came.

A test that must know when the caller first *heard* the agent (not when the server says its
first frame existed) offers this port in its SDP (tests.support.sipp.UdpDialog): the agent
sends its RTP here, and `first_sound()` is the arrival time (wall clock, the clock the dialog
times its answers on) of the first PCMU packet carrying sound, not the silence a port plays.
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np

#: peak (full scale 1.0) above which a packet carries the agent's sound: far above μ-law's
#: silence code (0xFF decodes to 0), far below the demo agent's noise
SOUND_PEAK = 0.01


def _mulaw(payload: bytes) -> np.ndarray:
    """G.711 μ-law to float (ITU-T G.711, as telephony/audio/codecs.py does it)."""
    u = ~np.frombuffer(payload, dtype=np.uint8)
    sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    magnitude = (((mantissa.astype(np.int32) << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.float32) / 32768.0


class RtpTap:
    """A UDP port on 127.0.0.1 that records (arrival time, payload type, peak) per RTP packet."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.packets: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rtp-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            t = time.time()
            if len(data) < 12 or data[0] >> 6 != 2:  # not RTP (version 2)
                continue
            pt = data[1] & 0x7F
            header = 12 + 4 * (data[0] & 0x0F)
            peak = float(np.abs(_mulaw(data[header:])).max()) if pt == 0 and len(data) > header else 0.0
            self.packets.append((t, pt, peak))

    def first_sound(self) -> float | None:
        """When the first PCMU packet with sound arrived (None: none yet)."""
        return next((t for t, pt, peak in list(self.packets) if pt == 0 and peak > SOUND_PEAK), None)

    def first_packet(self) -> float | None:
        return self.packets[0][0] if self.packets else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
