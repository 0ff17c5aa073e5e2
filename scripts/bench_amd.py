"""Answering-machine detection on generated greetings: how often is it right? (a figure, not a test)

Makes espeak-ng recordings the detector never saw while it was tuned: voicemail greetings of
different lengths and short "hello"s a person says, in several voices and speeds, each with
0.4 s of silence before (the callee's pick-up) and 3 s after (a person waits), at 16 kHz (the SIP
leg's rate), optionally with background noise. Prints the confusion table and each error.

    python scripts/bench_amd.py [--noise-dbfs -50] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from telephony.amd import AmdSettings, MachineDetector  # noqa: E402

RATE = 16000
MACHINE = [
    "Hi, you've reached Mark. I can't take your call right now. Please leave a message after the tone.",
    "Hello, this is the voicemail of Sarah Jones. Leave your name and number and I will call you back.",
    "The person you are calling is not available. Please record your message after the beep.",
    "You have reached the offices of Miller and Sons. Our office hours are nine to five, Monday to Friday.",
    "Hey, it's Dave, leave a message.",
    "Thanks for calling. Nobody is here right now, so leave a message.",
    "Hello, you have reached extension four five two. Please leave a message.",
    "Hi, this is Anna. Sorry I missed your call. Leave a message and I'll get back to you as soon as I can.",
]
HUMAN = ["Hello?", "Hello.", "Yes?", "Hi, who is this?", "Hello, Anna speaking.", "Hello? Who's calling?",
         "Yeah?", "Good morning."]
VOICES = ["en-us", "en", "en-us+f3", "en+m3"]
SPEEDS = [150, 185]


def speak(text: str, voice: str, speed: int, tmp: Path) -> np.ndarray:
    raw = tmp / "say.wav"
    out = tmp / "say16.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", "-b", "16", str(out)], check=True, capture_output=True)
    with wave.open(str(out)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    return pcm


def classify(pcm: np.ndarray, noise_dbfs: float | None, rng: np.random.Generator) -> tuple[str, float]:
    audio = np.concatenate([np.zeros(int(0.4 * RATE), np.float32), pcm, np.zeros(3 * RATE, np.float32)])
    if noise_dbfs is not None:
        audio = audio + rng.normal(0, 10 ** (noise_dbfs / 20), len(audio)).astype(np.float32)
    det = MachineDetector(RATE, AmdSettings())
    for i in range(0, len(audio), 320):  # 20 ms packets, as RTP brings them
        if det.feed(audio[i:i + 320]) is not None:
            break
    verdict = det.close()
    return verdict.value, det.decided_at or 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--noise-dbfs", type=float, default=None, help="white noise under every recording")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for truth, texts in (("machine", MACHINE), ("human", HUMAN)):
            for text in texts:
                for voice in VOICES:
                    for speed in SPEEDS:
                        pcm = speak(text, voice, speed, tmp)
                        got, at = classify(pcm, args.noise_dbfs, rng)
                        rows.append({"truth": truth, "got": got, "seconds": round(len(pcm) / RATE, 2),
                                     "decided_at_s": at, "voice": voice, "speed": speed, "text": text})
    table: dict[str, dict[str, int]] = {}
    for r in rows:
        table.setdefault(r["truth"], {}).setdefault(r["got"], 0)
        table[r["truth"]][r["got"]] += 1
    right = sum(r["truth"] == r["got"] for r in rows)
    print(f"{len(rows)} recordings, noise {args.noise_dbfs} dBFS: {right} right ({100 * right / len(rows):.1f}%)")
    for truth, got in table.items():
        lengths = [r["seconds"] for r in rows if r["truth"] == truth]
        decided = [r["decided_at_s"] for r in rows if r["truth"] == truth and r["got"] == truth]
        print(f"  {truth:8s} ({len(lengths)}, {min(lengths):.1f}-{max(lengths):.1f} s long): {got}; "
              f"verdict after median {np.median(decided) if decided else float('nan'):.2f} s of audio")
    for r in rows:
        if r["truth"] != r["got"]:
            print(f"  wrong: {r}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
