"""A real SIP caller on pjsua2 (run as its own process: one pjsua2 Endpoint per process).

Dials URI, plays WAV into the call, records what it hears to OUT, optionally sends DTMF, hangs
up after SECONDS and prints a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import pjsua2 as pj


class Call(pj.Call):
    def __init__(self, acc, player_wav, record_wav):
        super().__init__(acc)
        self.player_wav, self.record_wav = player_wav, record_wav
        self.player = self.recorder = None
        self.state = None
        self.last_code = None
        self.codec = None
        self.media_active = False

    def onCallState(self, prm):
        ci = self.getInfo()
        self.state = ci.state
        self.last_code = ci.lastStatusCode

    def onCallMediaState(self, prm):
        ci = self.getInfo()
        for mi in ci.media:
            if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                am = self.getAudioMedia(mi.index)
                if self.player is None:
                    self.player = pj.AudioMediaPlayer()
                    self.player.createPlayer(self.player_wav, pj.PJMEDIA_FILE_NO_LOOP)
                    self.recorder = pj.AudioMediaRecorder()
                    self.recorder.createRecorder(self.record_wav)
                self.player.startTransmit(am)
                am.startTransmit(self.recorder)
                self.media_active = True
                try:
                    self.codec = self.getStreamInfo(mi.index).codecName
                except pj.Error:
                    pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("uri")
    ap.add_argument("wav")
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--dtmf", default="")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--codec", default="", help="prefer this codec id prefix (e.g. PCMU, G722, opus)")
    ap.add_argument("--tls", action="store_true", help="signal over TLS (the URI should say transport=tls)")
    args = ap.parse_args()
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.uaConfig.threadCnt = 0
    cfg.uaConfig.mainThreadOnly = True
    cfg.logConfig.level = 1
    cfg.logConfig.consoleLevel = 1
    cfg.medConfig.clockRate = 16000
    cfg.medConfig.sndClockRate = 16000
    # RTP all the time, as a trunk sends it: with pjmedia's VAD a caller who listens sends one
    # packet per 5 s of silence, and the tests' short media timeouts would end the call
    cfg.medConfig.noVad = True
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()
    tc = pj.TransportConfig()
    tc.port = args.port
    tc.boundAddress = "127.0.0.1"
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tc)
    if args.tls:
        tls = pj.TransportConfig()
        tls.port = 0
        tls.boundAddress = "127.0.0.1"
        ep.transportCreate(pj.PJSIP_TRANSPORT_TLS, tls)
    ep.libStart()
    if args.codec:
        for info in ep.codecEnum2():
            ep.codecSetPriority(info.codecId, 255 if info.codecId.lower().startswith(args.codec.lower()) else 0)
    acc = pj.Account()
    ac = pj.AccountConfig()
    ac.idUri = "sip:tester@127.0.0.1"
    ac.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
    acc.create(ac)
    call = Call(acc, args.wav, args.out)
    result = {}
    try:
        call.makeCall(args.uri, pj.CallOpParam(True))
        t_end = time.monotonic() + args.seconds + 20
        answered_at = None
        sent = False
        while time.monotonic() < t_end:
            ep.libHandleEvents(10)
            if call.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                break
            if call.state == pj.PJSIP_INV_STATE_CONFIRMED and answered_at is None:
                answered_at = time.monotonic()
            if answered_at and args.dtmf and not sent and time.monotonic() - answered_at > 1.0:
                call.dialDtmf(args.dtmf)
                sent = True
            if answered_at and time.monotonic() - answered_at > args.seconds:
                call.hangup(pj.CallOpParam(True))
                answered_at = float("inf")
        # the far end hung up (a BYE) before we did: answered, disconnected, and not by us
        remote_hangup = (answered_at is not None and answered_at != float("inf")
                         and call.state == pj.PJSIP_INV_STATE_DISCONNECTED)
        result = {"answered": answered_at is not None, "last_code": call.last_code, "codec": call.codec,
                  "media_active": call.media_active, "remote_hangup": remote_hangup}
    finally:
        for _ in range(50):
            ep.libHandleEvents(10)
        if call.player is not None:
            del call.player
        if call.recorder is not None:
            del call.recorder
        del call
        acc.shutdown()
        del acc
        ep.libDestroy()
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
