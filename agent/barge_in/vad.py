"""Barge-in VAD for every call at once: one Silero forward per 32 ms chunk for all live calls.

Silero VAD is a small recurrent network; run call by call it costs about 0.2 ms of interpreter
time per 32 ms chunk, which at a GPU's call counts competes with the engine thread. Its state is
two small tensors per stream (the recurrent state and the last 64 input samples), so we keep
them per call, outside the model, and run the calls that have a chunk ready as one batch.
Calls join and leave the batch freely; each keeps its own state.

The worker runs on its own thread and takes typed messages; what it decides (barge-in, echo
suppressed) goes back to the call's session. Rounds run on a fixed clock, one per chunk's time
(ROUND_S), and a round is one forward: each call with a whole chunk waiting gives its oldest.
Packets of different calls arrive at different moments and in different sizes (a carrier's
20 ms, the SIP port's whole tick of 80 ms); running every whole chunk at once split a round
into two or three forwards of a part of the calls each (measured with 24 Twilio streams: 61
forwards a second of 12 calls, each forward's cost being mostly fixed), where one forward of
all the calls per round does the same work. A call whose audio came in a lump catches up over
the next rounds (one chunk each, as its audio keeps coming at one chunk per round); only one
that is MAX_BEHIND chunks behind gets another forward in the same round. The wait adds at most
a round or two (32-64 ms) to a detection that needs `min_speech_ms` (160 ms) of speech anyway,
and each chunk's verdict carries the time its audio ended, not the round's.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import structlog
import torch

from agent.calls.events import CallState
from agent.resample import Resampler
from agent.timebase import SAMPLE_RATE
from agent.osthread import name_os_thread

if TYPE_CHECKING:
    from agent.calls.session import CallSession

log = structlog.get_logger(__name__)

VAD_RATE = 16000
VAD_CHUNK = 512  # samples at 16 kHz (32 ms): what Silero VAD takes
CONTEXT = 64  # samples of the previous chunk Silero prepends at 16 kHz
STATE_SHAPE = (2, 1, 128)
ROUND_S = VAD_CHUNK / VAD_RATE  # one round per chunk's time: every call then has about one chunk
MAX_BEHIND = 3  # chunks waiting after a round's forward that earn a stream another one (96 ms)


def load_silero_net() -> torch.nn.Module:
    """Silero VAD's 16 kHz network (the jit model shipped in the `silero-vad` wheel)."""
    threads = torch.get_num_threads()
    import silero_vad  # its import sets torch's thread count to 1 for the whole process

    torch.set_num_threads(threads)
    return silero_vad.load_silero_vad()._model


@dataclass
class VadStream:
    """One call's VAD state: 24 kHz in, 16 kHz chunks, the network's recurrent state.

    The state is kept as numpy (a view into the last round's output): a round then builds its
    batch with one slice assignment per stream instead of a handful of small torch operations,
    which were most of a round's interpreter time with dozens of calls."""

    resample: Resampler = field(default_factory=lambda: Resampler(SAMPLE_RATE, VAD_RATE))
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    state: np.ndarray = field(default_factory=lambda: np.zeros((STATE_SHAPE[0], STATE_SHAPE[2]), np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT, np.float32))
    arrived: list[np.ndarray] = field(default_factory=list)  # 24 kHz packets not yet resampled

    def feed(self, pcm24k: np.ndarray) -> None:
        self.pending = np.concatenate([self.pending, self.resample(pcm24k)])

    def take_arrived(self) -> None:
        """Resample what arrived since the last round in one call (one per round, not per packet)."""
        if self.arrived:
            pcm = self.arrived[0] if len(self.arrived) == 1 else np.concatenate(self.arrived)
            self.arrived = []
            self.feed(pcm)

    @property
    def ready(self) -> bool:
        return len(self.pending) >= VAD_CHUNK

    def next_chunk(self) -> np.ndarray:
        chunk, self.pending = self.pending[:VAD_CHUNK], self.pending[VAD_CHUNK:]
        return chunk


class BatchedVad:
    """Speech probabilities for many streams, one network forward per round of chunks."""

    def __init__(self, net: torch.nn.Module | None = None):
        self.net = net if net is not None else load_silero_net()
        self.forwards = 0

    @torch.inference_mode()
    def forward(self, streams: list[VadStream]) -> list[float]:
        """One chunk of each stream (all must be `ready`) -> its speech probability."""
        n = len(streams)
        x = np.empty((n, CONTEXT + VAD_CHUNK), np.float32)
        state = np.empty((STATE_SHAPE[0], n, STATE_SHAPE[2]), np.float32)
        for i, s in enumerate(streams):
            x[i, :CONTEXT] = s.context
            x[i, CONTEXT:] = s.next_chunk()
            state[:, i] = s.state
        out, new_state = self.net(torch.from_numpy(x), torch.from_numpy(state))
        self.forwards += 1
        kept = new_state.numpy()
        for i, s in enumerate(streams):
            s.state = kept[:, i]
            s.context = x[i, -CONTEXT:]
        return out[:, 0].tolist()

    def run(self, streams: list[VadStream], keep: int = 0) -> list[list[float]]:
        """One forward of every stream with a whole chunk, then more forwards of the streams that
        still have more than `keep` whole chunks -> probabilities per stream, oldest first.
        `keep=0`: every whole chunk; the worker keeps up to MAX_BEHIND - 1 for later rounds."""
        probs: list[list[float]] = [[] for _ in streams]
        least = 1
        while True:
            idx = [i for i, s in enumerate(streams) if len(s.pending) >= least * VAD_CHUNK]
            if not idx:
                return probs
            for i, p in zip(idx, self.forward([streams[i] for i in idx])):
                probs[i].append(p)
            least = keep + 1


# -- the worker ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AudioIn:
    session: "CallSession"
    pcm: np.ndarray


@dataclass(frozen=True)
class Forget:
    call_id: str


@dataclass(frozen=True)
class Stop:
    pass


VadMessage = AudioIn | Forget | Stop


@dataclass
class VadVerdicts:
    """What the worker tells its owner (metrics and logs live there)."""

    on_barge_in: Callable[["CallSession"], None]
    on_suppressed: Callable[["CallSession"], None]


class VadWorker:
    """The VAD thread: collects every call's audio that arrived since its last round, runs the
    chunks that are ready as batches, and feeds each call's barge-in detector."""

    def __init__(self, verdicts: VadVerdicts):
        self.verdicts = verdicts
        self._q: queue.SimpleQueue[VadMessage] = queue.SimpleQueue()
        self._streams: dict[str, tuple["CallSession", VadStream]] = {}
        self._thread: threading.Thread | None = None
        self._vad: BatchedVad | None = None
        self._loaded = threading.Event()
        self.rounds = 0  # rounds that ran the network (benchmarks, tests)
        self.forwards = 0  # network forwards those rounds took (one each unless a call fell behind)
        self.chunks = 0
        self._behind = False  # some call still has a whole chunk waiting after the last round

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vad", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float = 30.0) -> bool:
        return self._loaded.wait(timeout)

    def stop(self) -> None:
        if self._thread is not None:
            self._q.put(Stop())
            self._thread.join(timeout=5)
            self._thread = None

    # any thread
    def audio(self, session: "CallSession", pcm: np.ndarray) -> None:
        self._q.put(AudioIn(session, pcm))

    def forget(self, call_id: str) -> None:
        self._q.put(Forget(call_id))

    # VAD thread
    def _run(self) -> None:
        name_os_thread("vad")
        # loaded up front: loading during calls would hold the GIL and stall the engine thread
        self._vad = BatchedVad()
        self._vad.forward([VadStream(pending=np.zeros(VAD_CHUNK, np.float32))])  # warm
        self._loaded.set()
        due = time.monotonic()
        while True:
            try:  # with chunks left from the last round, the next round comes whatever arrives
                msgs: list[VadMessage] = [self._q.get(timeout=ROUND_S if self._behind else None)]
            except queue.Empty:
                msgs = []
            now = time.monotonic()
            if now - due > ROUND_S:  # idle (or a round overran): the clock restarts now
                due = now
            elif due > now:  # let the other calls' packets of this chunk's time arrive
                time.sleep(due - now)
            due += ROUND_S  # a fixed clock: a late wake-up (the interpreter lock) is not carried over
            while True:  # everything that arrived meanwhile goes into this round
                try:
                    msgs.append(self._q.get_nowait())
                except queue.Empty:
                    break
            for m in msgs:
                if isinstance(m, Stop):
                    return
                if isinstance(m, Forget):
                    self._streams.pop(m.call_id, None)
                elif m.session.state is not CallState.ENDED:
                    entry = self._streams.get(m.session.call_id)
                    if entry is None:
                        entry = self._streams[m.session.call_id] = (m.session, VadStream())
                    entry[1].arrived.append(m.pcm)
            self._round()

    def _round(self) -> None:
        for _, stream in self._streams.values():
            stream.take_arrived()
        entries = [e for e in self._streams.values() if e[1].ready]
        if not entries:
            return
        forwards = self._vad.forwards
        try:
            probs = self._vad.run([s for _, s in entries], keep=MAX_BEHIND - 1)
        except Exception:
            log.exception("vad_failed")
            self._behind = False
            return
        self.rounds += 1
        self.forwards += self._vad.forwards - forwards
        now = time.monotonic()
        self._behind = False
        for (sess, stream), ps in zip(entries, probs):
            self.chunks += len(ps)
            self._behind = self._behind or stream.ready
            n, waiting = len(ps), len(stream.pending)
            for i, p in enumerate(ps):
                t = now - ((n - 1 - i) * VAD_CHUNK + waiting) / VAD_RATE  # when this chunk's audio ended
                with sess._lock:
                    verdict = sess.detector.on_vad(p, t)
                if verdict == "barge_in":
                    self.verdicts.on_barge_in(sess)
                elif verdict == "suppressed":
                    self.verdicts.on_suppressed(sess)
