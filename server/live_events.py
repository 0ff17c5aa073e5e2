"""Live call events for operators: `GET /api/calls/{call_id}/events` on the ops listener, as
Server-Sent Events.

A call's events come from the engine, VAD and transport threads; here they are only turned into
JSON (`server.event_json`) and handed to the server's event loop, and only while someone
watches that call. Each reader has its own bounded queue and a bounded socket: one that falls
behind (its queue full because its socket stopped taking bytes) is disconnected and counted,
so a slow reader can never slow a call, the engine or the other readers.

The stream: first a `call` event (the call as the call list shows it, with its whole transcript
so far), then `state`, `transcript`, `levels`, `barge_in`, `dtmf`, `hold`, `transfer`,
`transfer_failed`, `reprime` as they happen, and `end` last, after which the server closes the
stream. Each is `event: <type>` and `data: <one JSON object>` with `type` and `t` (seconds on the
call's clock). A comment line (`: keepalive`) goes out when nothing else did for
`ops.event_stream.keepalive_s`. README "Live calls" documents the objects.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import structlog
from aiohttp import web

from agent.calls.events import CallEvent, CallState
from agent.calls.session import CallSession
from agent.metrics import Metrics
from server.call_summary import live_call
from server.event_json import event_json

log = structlog.get_logger(__name__)

#: how often a stream whose reader is behind looks whether its bytes have gone out
WRITE_POLL_S = 0.05


class Reader:
    """One open stream: its queue and the connection to cut when it falls behind."""

    def __init__(self, call_id: str, size: int, transport: asyncio.Transport | None):
        self.call_id = call_id
        self.queue: asyncio.Queue[dict] = asyncio.Queue(size)
        self.transport = transport
        self.dropped = False


class LiveEvents:
    def __init__(self, metrics: Metrics, queue_size: int = 256, buffer_bytes: int = 65536,
                 keepalive_s: float = 15.0):
        self.metrics = metrics
        self.queue_size = queue_size
        self.buffer_bytes = buffer_bytes
        self.keepalive_s = keepalive_s
        self.loop: asyncio.AbstractEventLoop | None = None  # the ops listener's loop (set at start)
        self._readers: dict[str, set[Reader]] = {}  # call id -> readers (changed on the loop only)

    # -- calls (any thread) --------------------------------------------------------------------------
    def attach(self, sess: CallSession) -> None:
        """A scheduler `on_call_start` hook: the call's events may be watched from now on."""
        sess.subscribe(lambda ev: self._on_event(sess, ev))

    def _on_event(self, sess: CallSession, ev: CallEvent) -> None:
        loop = self.loop
        if loop is None or sess.call_id not in self._readers:
            return  # nobody watches: no work at all
        body = event_json(ev)
        if body is None:
            return
        body["t"] = round(sess.clock, 2)
        try:
            loop.call_soon_threadsafe(self._fan_out, sess.call_id, body)
        except RuntimeError:  # the loop has closed (shutting down)
            pass

    # -- the event loop ------------------------------------------------------------------------------
    def _fan_out(self, call_id: str, body: dict) -> None:
        for reader in list(self._readers.get(call_id, ())):
            try:
                reader.queue.put_nowait(body)
            except asyncio.QueueFull:
                self._drop(reader)

    def _drop(self, reader: Reader) -> None:
        """A reader too far behind: cut its connection (its pending write fails, its handler ends)."""
        if reader.dropped:
            return
        reader.dropped = True
        self._forget(reader)
        self.metrics.event_streams_dropped.inc()
        log.warning("event_stream_dropped", call_id=reader.call_id, reason="reader_behind",
                    queued=reader.queue.qsize())
        if reader.transport is not None:
            _reset(reader.transport)

    def _forget(self, reader: Reader) -> None:
        readers = self._readers.get(reader.call_id)
        if readers is not None:
            readers.discard(reader)
            if not readers:
                del self._readers[reader.call_id]

    def close(self) -> None:
        """At shutdown: end every stream still open (a call's `end` normally did already)."""
        for readers in list(self._readers.values()):
            for reader in list(readers):
                self._forget(reader)
                if reader.transport is not None:
                    reader.transport.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """GET /api/calls/{call_id}/events"""
        rt = request.app["runtime"]
        call_id = request.match_info["call_id"]
        sess = next((s for s in (rt.scheduler.active_calls if rt.scheduler else []) if s.call_id == call_id), None)
        if sess is None:
            return web.json_response({"error": "not_found", "reason": "no call in progress has this id"}, status=404)
        transport = request.transport
        self._bound(transport)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        reader = Reader(call_id, self.queue_size, transport)
        self._readers.setdefault(call_id, set()).add(reader)  # before the snapshot: nothing is missed
        self.metrics.event_streams.inc()
        try:
            first = live_call(sess, last_segments=1_000_000)
            first.update(type="call", t=round(sess.clock, 2))
            await _send(resp, first)
            await self._wait_for_room(transport, reader)
            if sess.state is CallState.ENDED:  # ended between the lookup and now
                await _send(resp, {"type": "end", "reason": sess.end_reason.value if sess.end_reason else None,
                                   "t": round(sess.clock, 2)})
                return resp
            while True:
                try:
                    body = await asyncio.wait_for(reader.queue.get(), self.keepalive_s)
                except TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                await _send(resp, body)
                if body["type"] == "end":
                    break
                await self._wait_for_room(transport, reader)
        except (ConnectionError, RuntimeError):
            pass  # the reader went away, or was dropped for falling behind
        finally:
            self._forget(reader)
            self.metrics.event_streams.dec()
        return resp

    async def _wait_for_room(self, transport: asyncio.Transport | None, reader: Reader) -> None:
        """While more than `buffer_bytes` wait in our buffer, send nothing more: events gather in
        the reader's queue meanwhile, and a full queue drops the reader (`_fan_out`)."""
        while transport is not None and not reader.dropped and not transport.is_closing() \
                and transport.get_write_buffer_size() > self.buffer_bytes:
            await asyncio.sleep(WRITE_POLL_S)
        if reader.dropped or (transport is not None and transport.is_closing()):
            raise ConnectionResetError("event stream reader dropped")

    def _bound(self, transport: asyncio.Transport | None) -> None:
        """About `buffer_bytes` in the kernel's send buffer for this reader, and as many in ours
        before it waits (`_wait_for_room`)."""
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.buffer_bytes)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=self.buffer_bytes)


def _reset(transport: asyncio.Transport) -> None:
    """Cut a connection with a reset, now: a plain close would leave the kernel sending what it
    holds to a reader that does not read (its zero window probed at backing-off intervals, up to
    minutes), and the reader would not learn it was dropped until that had drained."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


async def _send(resp: web.StreamResponse, body: dict) -> None:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    await resp.write(f"event: {body['type']}\ndata: {data}\n\n".encode())
