"""Optional per-call recordings for review: stereo wav (caller left, agent right) + JSON record."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import structlog

from agent.calls.events import Ended
from agent.calls.session import CallSession
from agent.timebase import FRAME_S, SAMPLE_RATE
from server import call_summary

log = structlog.get_logger(__name__)


class CallRecorder:
    """Collects a call's frames as the engine consumed/produced them and writes them at the end.

    The JSON beside the wav holds the call's prompt, variables, both sides' transcript segments
    (`server.call_summary`: the same the call-end webhook carries), its events (barge-ins, DTMF,
    hold, transfers, re-primes) and re-primes. Without `keep_text` the segments say who spoke
    when, not the words."""

    def __init__(self, directory: Path, max_files: int, keep_text: bool = True):
        self.directory = Path(directory).resolve()
        self.max_files = max_files
        self.keep_text = keep_text
        self._lock = threading.Lock()

    def base(self, sess: CallSession) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(sess.created_wall))
        return self.directory / f"{stamp}-{sess.call_id}"

    def paths(self, sess: CallSession) -> dict | None:
        """Where the call's record is written once it ends (None: a call with no agent frame has
        no record)."""
        if sess.stats.frames_out == 0:
            return None
        base = self.base(sess)
        return {"wav": str(base.with_suffix(".wav")), "json": str(base.with_suffix(".json"))}

    def attach(self, sess: CallSession) -> None:
        rec: dict = {"caller": [], "agent": []}

        def on_frame(caller: np.ndarray | None, agent: np.ndarray, text: str | None, index: int) -> None:
            rec["caller"].append(caller if caller is not None else np.zeros_like(agent))
            rec["agent"].append(agent)

        def on_event(ev) -> None:
            if isinstance(ev, Ended):
                threading.Thread(target=self._write, args=(sess, rec, ev.reason.value), daemon=True).start()

        sess.add_frame_tap(on_frame)
        sess.subscribe(on_event)

    def _write(self, sess: CallSession, rec: dict, reason: str | None) -> None:
        import sphn

        if not rec["agent"]:
            return
        # owner-only (the server's umask is 077 too): recordings are personal data
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        base = self.base(sess)
        stereo = np.stack([np.concatenate(rec["caller"]), np.concatenate(rec["agent"])]).astype(np.float32)
        tmp_wav = base.with_suffix(".wav.tmp")
        sphn.write_wav(str(tmp_wav), stereo, SAMPLE_RATE)
        os.replace(tmp_wav, base.with_suffix(".wav"))
        meta = {"call_id": sess.call_id, "persona": sess.persona.id, "number": sess.number,
                "endpoint": sess.endpoint, "direction": sess.direction, "caller_number": sess.caller, "dialled_number": sess.number,
                "started": sess.created_wall, **call_summary.times(sess), "reason": reason,
                "duration_s": round(len(rec["agent"]) * FRAME_S, 2), "prompt": sess.prompt, "variables": sess.variables,
                "transcript": call_summary.transcript(sess, self.keep_text),
                "events": call_summary.journal(sess),
                "dtmf": call_summary.dtmf_digits(sess), "transfer": call_summary.transfer(sess),
                # each re-prime: the agent frame it was swapped in after, the conversation frames kept
                "reprimes": list(sess.reprimes),
                # caller audio lost on the way in: the transport's (by kind) and the latency bound's
                "caller_audio_lost": sess.stats.lost(),
                "caller_audio_dropped_s": round(sess.stats.caller_dropped_s, 3),
                "queue_wait_s": sess.queue_wait_s,  # seconds on hold before a slot (None: no wait)
                "amd": sess.amd,  # a placed call's answering-machine verdict (None: inbound)
                "channels": {"left": "caller", "right": "agent"}}
        tmp_json = base.with_suffix(".json.tmp")
        tmp_json.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        os.replace(tmp_json, base.with_suffix(".json"))
        sess.log.info("call_recorded", path=str(base.with_suffix(".wav")))
        self._retain()

    def _retain(self) -> None:
        with self._lock:
            wavs = sorted(self.directory.glob("*.wav"), key=lambda p: p.stat().st_mtime)
            for old in wavs[: max(0, len(wavs) - self.max_files)]:
                old.unlink(missing_ok=True)
                old.with_suffix(".json").unlink(missing_ok=True)
