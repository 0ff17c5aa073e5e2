"""Prometheus metrics of the voice agent, in one registry per process (or per test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: 5 ms apart from 30 to 80 ms, where a step's distance from the 80 ms budget is judged
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.035, 0.04, 0.045, 0.05, 0.055, 0.06, 0.065, 0.07, 0.075, 0.08,
                0.1, 0.15, 0.25, 0.5, 1.0)
ANSWER_BUCKETS = (0.02, 0.05, 0.08, 0.1, 0.16, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0)
#: how late the engine thread wakes for its tick: the interpreter lock it waits for is shared
#: with every transport thread, so this is where a busy media plane would show in the engine
TICK_LATE_BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.04, 0.08)
REPRIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.active_calls = Gauge("personaplex_active_calls", "Calls in progress", ["endpoint"], registry=r)
        self.calls_total = Counter("personaplex_calls_total", "Calls by endpoint and outcome",
                                   ["endpoint", "outcome"], registry=r)
        # calls the agent placed, by final state (busy, no_answer, declined, failed, ended) and
        # answering-machine verdict (human, machine, unknown; "none" when never answered)
        self.outbound_calls = Counter("personaplex_outbound_calls_total", "Outbound calls by final state and AMD",
                                      ["state", "amd"], registry=r)
        self.capacity = Gauge("personaplex_capacity_calls", "Configured maximum of concurrent calls", registry=r)
        self.step_seconds = Histogram("personaplex_engine_step_seconds", "Engine time per 80 ms frame",
                                      buckets=STEP_BUCKETS, registry=r)
        self.tick_late_seconds = Histogram("personaplex_tick_late_seconds",
                                           "How late the engine thread woke for its 80 ms tick",
                                           buckets=TICK_LATE_BUCKETS, registry=r)
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
        self.caller_audio_lost = Counter("personaplex_caller_audio_lost_seconds_total",
                                         "Caller audio a transport should have delivered to the call and did not, "
                                         "by endpoint and kind (network loss, jitter buffer, bridge overrun, "
                                         "late or reordered frames given up)", ["endpoint", "kind"], registry=r)
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
        self.reprimes = Counter("personaplex_reprimes_total",
                                "Calls' model state rebuilt from their prompt and latest frames (re-prime), by "
                                "when it was swapped in (quiet: a pause; deadline: the context was nearly full)",
                                ["swap"], registry=r)
        self.reprime_seconds = Histogram("personaplex_reprime_build_seconds",
                                         "Time from a re-prime's start to its rows being in the call's slot",
                                         buckets=REPRIME_BUCKETS, registry=r)
        self.reprime_fallbacks = Counter("personaplex_reprime_fallbacks_total",
                                         "Calls that reached the context limit before their re-prime was ready "
                                         "(they slide until it is)", registry=r)
        self.dtmf = Counter("personaplex_dtmf_total", "DTMF digits received", ["endpoint"], registry=r)
        self.sip_refused_requests = Counter("personaplex_sip_refused_requests_total",
                                            "SIP requests refused as unwanted, by method and reason (refer, "
                                            "replaces, subscribe, out_of_dialog, forbidden_source)",
                                            ["method", "reason"], registry=r)
        self.datachannel_dropped = Counter("personaplex_datachannel_dropped_total",
                                           "Page messages dropped (too_large, too_fast)", ["reason"], registry=r)
        self.context_lookups = Counter("personaplex_context_lookups_total",
                                       "CRM context lookups by outcome (ok, timeout, error, invalid, too_large)",
                                       ["outcome"], registry=r)
        self.prompt_items_dropped = Counter("personaplex_prompt_items_dropped_total",
                                            "Information items cut from a per-call prompt to fit the model's "
                                            "context", registry=r)
        # call webhooks (server/webhooks): delivered, failed attempts, what waits on disk
        self.webhooks_delivered = Counter("personaplex_webhooks_delivered_total",
                                          "Webhook events delivered (a 2xx answer), by event", ["event"], registry=r)
        self.webhooks_failed = Counter("personaplex_webhooks_failed_total",
                                       "Failed webhook delivery attempts, by reason (timeout, connect, status_5xx, "
                                       "status_408, status_429: retried; status_4xx, redirect: dead-lettered)",
                                       ["reason"], registry=r)
        self.webhooks_dead_lettered = Counter("personaplex_webhooks_dead_lettered_total",
                                              "Webhook events given up on and kept as dead letters, by reason "
                                              "(rejected: a 4xx answer; expired: older than webhooks.max_age_s)",
                                              ["reason"], registry=r)
        self.webhooks_evicted = Counter("personaplex_webhooks_evicted_total",
                                        "Webhook events deleted unsent to keep the queue within webhooks.max_queue, "
                                        "by what they were (dead: a dead letter; pending: not yet delivered)",
                                        ["was"], registry=r)
        self.webhooks_queue_depth = Gauge("personaplex_webhooks_queue_depth",
                                          "Webhook events waiting for delivery (on disk)", registry=r)
        self.webhooks_dead_letters = Gauge("personaplex_webhooks_dead_letters",
                                           "Dead-lettered webhook events kept on disk", registry=r)
        # the ops listener's live event streams (/api/calls/{id}/events)
        self.event_streams = Gauge("personaplex_event_streams", "Live call event streams open", registry=r)
        self.event_streams_dropped = Counter("personaplex_event_streams_dropped_total",
                                             "Live call event streams closed because their reader fell behind",
                                             registry=r)
        # farm dashboards (deploy/, README "Scaling out"): set from the scheduler at each scrape
        self.slots_total = Gauge("personaplex_slots_total", "Call slots of this agent (engine.max_calls)", registry=r)
        self.slots_busy = Gauge("personaplex_slots_busy", "Call slots taken by calls", registry=r)
        self.draining = Gauge("personaplex_draining", "1 while the agent drains (takes no new calls)", registry=r)
        # the call queue (telephony.call_queue): callers on hold while every slot is busy
        self.queue_depth = Gauge("personaplex_queue_depth", "Callers waiting for a free slot", registry=r)
        self.queue_wait_seconds = Histogram("personaplex_queue_wait_seconds",
                                            "Time a caller waited in the queue, whatever the outcome",
                                            ["outcome"], buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
                                            registry=r)
        self.queue_outcomes = Counter("personaplex_queue_outcomes_total",
                                      "Queued callers by outcome (answered, abandoned, timed_out, refused)",
                                      ["endpoint", "outcome"], registry=r)

    def observe_slots(self, scheduler) -> None:
        """Slots total/busy and the draining flag, as the scheduler has them now (called per scrape)."""
        total = scheduler.config.max_calls
        self.slots_total.set(total)
        self.slots_busy.set(total - scheduler.capacity_left)
        self.draining.set(1.0 if scheduler.draining else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
