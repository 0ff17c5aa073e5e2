"""Prometheus metrics of the voice agent, in one registry per process (or per test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
ANSWER_BUCKETS = (0.02, 0.05, 0.08, 0.1, 0.16, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.active_calls = Gauge("personaplex_active_calls", "Calls in progress", ["endpoint"], registry=r)
        self.calls_total = Counter("personaplex_calls_total", "Calls by endpoint and outcome",
                                   ["endpoint", "outcome"], registry=r)
        self.capacity = Gauge("personaplex_capacity_calls", "Configured maximum of concurrent calls", registry=r)
        self.step_seconds = Histogram("personaplex_engine_step_seconds", "Engine time per 80 ms frame",
                                      buckets=STEP_BUCKETS, registry=r)
        self.prefill_seconds = Histogram("personaplex_prefill_seconds",
                                         "Time from a prefill's start to its rows being in their slots",
                                         buckets=STEP_BUCKETS, registry=r)
        self.answer_seconds = Histogram("personaplex_answer_to_first_audio_seconds",
                                        "From call start to the first agent audio frame",
                                        buckets=ANSWER_BUCKETS, registry=r)
        self.late_inbound = Counter("personaplex_late_inbound_frames_total",
                                    "Ticks the model heard silence because the caller's audio had stopped arriving",
                                    registry=r)
        self.catch_up_steps = Counter("personaplex_catch_up_steps_total",
                                      "Extra steps that consumed caller audio a late tick left waiting", registry=r)
        self.caller_audio_dropped = Counter("personaplex_caller_audio_dropped_seconds_total",
                                            "Caller audio dropped because it waited longer than the latency bound",
                                            registry=r)
        self.playout_underruns = Counter("personaplex_playout_underruns_total",
                                         "Endpoint playout ticks with no agent audio ready, by cause "
                                         "(late: the engine was late; barge_in: a barge-in flushed it)",
                                         ["endpoint", "cause"], registry=r)
        self.engine_overruns = Counter("personaplex_engine_overruns_total", "Frames where the engine overran 80 ms",
                                       registry=r)
        self.barge_ins = Counter("personaplex_barge_ins_total", "Caller talked over the agent", registry=r)
        self.barge_ins_suppressed = Counter("personaplex_barge_ins_suppressed_total",
                                            "Caller speech ignored as echo or too short", registry=r)
        self.persona_reload_errors = Counter("personaplex_persona_reload_errors_total",
                                             "Persona files rejected on (re)load", registry=r)
        self.calls_at_context_limit = Counter("personaplex_calls_at_context_limit_total",
                                              "Calls that reached the model's context limit", registry=r)
        self.dtmf = Counter("personaplex_dtmf_total", "DTMF digits received", ["endpoint"], registry=r)
        self.datachannel_dropped = Counter("personaplex_datachannel_dropped_total",
                                           "Page messages dropped (too_large, too_fast)", ["reason"], registry=r)
        self.context_lookups = Counter("personaplex_context_lookups_total",
                                       "CRM context lookups by outcome (ok, timeout, error, invalid, too_large)",
                                       ["outcome"], registry=r)
        self.prompt_items_dropped = Counter("personaplex_prompt_items_dropped_total",
                                            "Information items cut from a per-call prompt to fit the model's "
                                            "context", registry=r)
        # farm dashboards (deploy/, README "Scaling out"): set from the scheduler at each scrape
        self.slots_total = Gauge("personaplex_slots_total", "Call slots of this agent (engine.max_calls)", registry=r)
        self.slots_busy = Gauge("personaplex_slots_busy", "Call slots taken by calls", registry=r)
        self.draining = Gauge("personaplex_draining", "1 while the agent drains (takes no new calls)", registry=r)

    def observe_slots(self, scheduler) -> None:
        """Slots total/busy and the draining flag, as the scheduler has them now (called per scrape)."""
        total = scheduler.config.max_calls
        self.slots_total.set(total)
        self.slots_busy.set(total - scheduler.capacity_left)
        self.draining.set(1.0 if scheduler.draining else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
