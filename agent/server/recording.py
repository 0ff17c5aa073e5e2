"""Optional per-call recordings for review: stereo wav (caller left, agent right) + transcript."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import structlog

from agent.events import BargeIn, Dtmf, Ended
from agent.session import CallSession
from agent.timebase import FRAME_S, SAMPLE_RATE

log = structlog.get_logger(__name__)


class CallRecorder:
    """Collects a call's frames as the engine consumed/produced them and writes them at the end."""

    def __init__(self, directory: Path, max_files: int):
        self.directory = Path(directory)
        self.max_files = max_files
        self._lock = threading.Lock()

    def attach(self, sess: CallSession) -> None:
        rec = {"caller": [], "agent": [], "text": [], "t0": time.time()}

        def on_frame(caller: np.ndarray | None, agent: np.ndarray, text: str | None, index: int) -> None:
            rec["caller"].append(caller if caller is not None else np.zeros_like(agent))
            rec["agent"].append(agent)
            if text:
                rec["text"].append({"t": round(index * FRAME_S, 2), "text": text})

        def on_event(ev) -> None:
            t = round(len(rec["agent"]) * FRAME_S, 2)
            if isinstance(ev, Ended):
                threading.Thread(target=self._write, args=(sess, rec, ev.reason.value), daemon=True).start()
            elif isinstance(ev, BargeIn):
                rec["text"].append({"t": t, "event": "barge_in", "generation": ev.generation})
            elif isinstance(ev, Dtmf):
                rec["text"].append({"t": t, "event": "dtmf", "digit": ev.digit})

        sess.recorder = on_frame
        sess.subscribe(on_event)

    def _write(self, sess: CallSession, rec: dict, reason: str | None) -> None:
        import sphn

        if not rec["agent"]:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(rec["t0"]))
        base = self.directory / f"{stamp}-{sess.call_id}"
        stereo = np.stack([np.concatenate(rec["caller"]), np.concatenate(rec["agent"])]).astype(np.float32)
        tmp_wav = base.with_suffix(".wav.tmp")
        sphn.write_wav(str(tmp_wav), stereo, SAMPLE_RATE)
        os.replace(tmp_wav, base.with_suffix(".wav"))
        meta = {"call_id": sess.call_id, "persona": sess.persona.id, "number": sess.number,
                "endpoint": sess.endpoint, "started": rec["t0"], "reason": reason,
                "duration_s": round(len(rec["agent"]) * FRAME_S, 2), "prompt": sess.prompt, "variables": sess.variables,
                "transcript": rec["text"],
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
