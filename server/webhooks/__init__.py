"""Call webhooks: signed POSTs of call events to the company's systems, at least once.

An event (`call_end`, optionally `call_start`) is built from the call's session (`payload`),
written to a queue on disk (`queue`, SQLite in WAL mode under `state_dir`) by the thread that
saw the event, and only then tried: a worker thread with its own asyncio loop and aiohttp
client (`delivery`) posts it, signed (`signing`), and applies the policy (`policy`): a 2xx
deletes it, a 4xx other than 408/429 dead-letters it, anything else retries with exponential
backoff and jitter until `webhooks.max_age_s`. The queue outlives a restart or a `kill -9`: what
was not delivered is delivered after the next start (so a receiver may see an event twice, with
the same `Idempotency-Key`). `service` ties these to the runtime.

The modules here other than `service` and `payload` import neither torch nor the agent's
sessions, so they are tested on their own.
"""
