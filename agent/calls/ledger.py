"""The end-of-call ledger: counters and the `call_end` log line, written once per call.

What an operator reads after a call (duration, frames each way, late and dropped audio,
barge-ins, underruns, re-primes, the reason) comes from here, so dashboards and logs agree.
"""

from __future__ import annotations

from agent.calls.events import EndReason
from agent.metrics import Metrics
from agent.calls.session import CallSession


class Ledger:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def started(self, sess: CallSession) -> None:
        self.metrics.active_calls.labels(sess.endpoint).inc()

    def ended(self, sess: CallSession, reason: EndReason) -> None:
        m = self.metrics
        m.active_calls.labels(sess.endpoint).dec()
        outcome = "answered" if sess.answered_at else ("failed" if reason is EndReason.FAILED else "abandoned")
        m.calls_total.labels(sess.endpoint, outcome).inc()
        st = sess.stats
        sess.log.info("call_end", reason=reason.value, direction=sess.direction, duration_s=round(sess.duration, 2),
                      frames_in=st.frames_in, frames_out=st.frames_out, late_frames=st.late_inbound,
                      catch_up_steps=st.catch_up_steps, caller_audio_dropped_s=round(st.caller_dropped_s, 3),
                      caller_audio_lost_s=round(st.caller_lost_s, 3), caller_audio_lost=st.lost(),
                      barge_ins=st.barge_ins, barge_ins_suppressed=st.barge_ins_suppressed,
                      caller_peak=round(st.caller_peak, 4), playout_underruns=st.playout_underruns,
                      underruns_after_barge_in=st.underruns_after_barge_in,
                      barge_in_flushed_s=round(st.barge_in_flushed_s, 3), engine_overruns=st.engine_overruns,
                      answer_ticks=sess.answer_ticks, reprimes=sess.reprimes,
                      **({"queue_wait_s": sess.queue_wait_s} if sess.queue_wait_s is not None else {}))
