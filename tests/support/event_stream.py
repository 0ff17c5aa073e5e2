"""Readers of a call's live event stream (`GET /api/calls/{id}/events`, Server-Sent Events).

`EventStream` reads in a thread of its own, as a supervisor console would, and keeps every
event; `StalledReader` opens the stream and never reads a byte (a reader that fell behind).
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from urllib.parse import urlsplit


class EventStream:
    def __init__(self, url: str, headers: dict | None = None):
        self.url = url
        self.events: list[dict] = []
        self.names: list[str] = []  # each event's `event:` line, to check it matches its `type`
        self.status: int | None = None
        self.content_type: str | None = None
        self.closed = threading.Event()  # the server ended the stream (or the connection broke)
        self.error: str | None = None
        self._resp = None
        self._thread = threading.Thread(target=self._read, args=(headers or {},), daemon=True)
        self._thread.start()

    def _read(self, headers: dict) -> None:
        try:
            req = urllib.request.Request(self.url, headers=headers)
            with urllib.request.urlopen(req, timeout=30) as resp:
                self._resp = resp
                self.status, self.content_type = resp.status, resp.headers.get("Content-Type")
                name, data = None, []
                for raw in resp:
                    line = raw.decode().rstrip("\n").rstrip("\r")
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        data.append(line[6:])
                    elif not line and data:
                        self.names.append(name or "")
                        self.events.append(json.loads("\n".join(data)))
                        name, data = None, []
        except Exception as exc:  # a closed or cut connection ends the reading
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.closed.set()

    def of(self, kind: str) -> list[dict]:
        return [e for e in list(self.events) if e.get("type") == kind]

    def close(self) -> None:
        resp = self._resp
        if resp is not None:
            try:
                resp.close()
            except Exception:
                pass
        self._thread.join(5)


class StalledReader:
    """Asks for the stream with the smallest receive buffer and never reads it."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        self.sock.connect((parts.hostname, parts.port))
        self.sock.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/event-stream\r\n\r\n"
                          .encode())

    def cut(self) -> bool:
        """True once the server has closed or reset the connection (reads what is buffered)."""
        self.sock.settimeout(0.5)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except socket.timeout:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()
