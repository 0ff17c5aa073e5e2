"""A real webhook receiver for tests: aiohttp on 127.0.0.1 in a thread of its own.

It checks each request's signature as a company's receiver would (`server.webhooks.signing.verify`
on the raw body), records every attempt, and answers as told: `answer(500, 500)` queues the
statuses of the next requests, `mode` says what comes after them ("ok": 200; a number: that
status; "hang": no answer for `hang_s`; "slow": 200 after `delay_s`). `stop()` takes it off
the port (connections are refused) and `start()` puts it back on the same port.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

from aiohttp import web

from server.webhooks.signing import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify
from tests.support import free_port


@dataclass
class Received:
    key: str | None
    event: str | None
    attempt: int
    body: bytes
    signature: str | None
    valid: bool  # the signature verified against the receiver's secret, within the replay window
    status: int | None = None  # what was answered (None: it hung)
    at: float = field(default_factory=time.monotonic)

    @property
    def json(self) -> dict:
        return json.loads(self.body)


class Receiver:
    def __init__(self, secret: bytes, port: int | None = None, path: str = "/hooks"):
        self.secret = secret
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}{path}"
        self.path = path
        self.mode: str | int = "ok"
        self.hang_s = 30.0
        self.delay_s = 0.0
        self.requests: list[Received] = []
        self._answers: dict[str | None, list] = {}  # event (None: any) -> statuses of its next requests
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhook-receiver", daemon=True)
        self._thread.start()
        self._runner: web.AppRunner | None = None

    # -- control (test thread) ----------------------------------------------------------------------
    def start(self) -> "Receiver":
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(15)

    def close(self) -> None:
        self.stop()
        asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _cancel_all(self) -> None:
        """Requests still hanging end here, not as tasks destroyed with the loop."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def reset(self) -> None:
        """Answer 200 to everything again, on its port."""
        with self._lock:
            self.mode = "ok"
            self._answers.clear()
        if self._runner is None:
            self.start()

    def answer(self, *statuses, event: str | None = None) -> None:
        """The statuses of the next requests (of `event`), in order (then `mode` again)."""
        with self._lock:
            self._answers.setdefault(event, []).extend(statuses)

    def delivered(self, event: str | None = None) -> list[Received]:
        """Requests answered 2xx (of `event`)."""
        with self._lock:
            return [r for r in self.requests if r.status is not None and 200 <= r.status < 300
                    and (event is None or r.event == event)]

    def of(self, key: str) -> list[Received]:
        """Every attempt with this idempotency key."""
        with self._lock:
            return [r for r in self.requests if r.key == key]

    # -- the server (its own loop) ------------------------------------------------------------------
    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def _stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        sig = request.headers.get(SIGNATURE_HEADER)
        rec = Received(request.headers.get(IDEMPOTENCY_HEADER), request.headers.get("X-PersonaPlex-Event"),
                       int(request.headers.get("X-PersonaPlex-Attempt", "0")), body, sig,
                       verify(self.secret, sig, body))
        with self._lock:
            self.requests.append(rec)
            queued = self._answers.get(rec.event) or self._answers.get(None)
            status = queued.pop(0) if queued else self.mode
        if status == "hang":
            await asyncio.sleep(self.hang_s)
            return web.Response(status=200)  # long after the sender gave up: not a delivery
        if status == "slow":
            await asyncio.sleep(self.delay_s)
            status = 200
        status = 200 if status == "ok" else int(status)
        rec.status = status
        headers = {"Retry-After": "1"} if status == 429 else {}
        return web.Response(status=status, text="ok" if status < 300 else "no", headers=headers)
