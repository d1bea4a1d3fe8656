"""An HTTP proxy on 127.0.0.1 in front of an S3-compatible server that can fail requests
(test support for outages).

``FaultProxy(target).start()`` forwards every request to ``target`` (moto's server) and its
answer back. While ``block(prefix, ...)`` is in force, requests whose path starts with one of
the prefixes (``/bucket/key-prefix``) are cut: the connection is closed without an answer, as
an unreachable store node does. ``unblock()`` ends the outage; ``cut`` counts the requests cut.
While ``hold(prefix, ...)`` is in force, such requests wait (a stalled store) until
``release()``; ``held`` counts the requests that waited.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


class FaultProxy:
    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.prefixes: tuple[str, ...] = ()
        self.cut = 0
        self.held = 0
        self._holding: tuple[str, ...] = ()
        self._go = threading.Event()
        self._go.set()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def block(self, *prefixes: str) -> None:
        with self._lock:
            self.prefixes = tuple(prefixes)

    def unblock(self) -> None:
        self.block()

    def hold(self, *prefixes: str) -> None:
        with self._lock:
            self._holding = tuple(prefixes)
            self._go.clear()

    def release(self) -> None:
        with self._lock:
            self._holding = ()
            self._go.set()

    def _wait_if_held(self, path: str) -> None:
        with self._lock:
            hit = any(path.startswith(p) for p in self._holding)
            self.held += hit
        if hit:
            self._go.wait(timeout=600)  # bounded: a forgotten hold cannot hang the suite

    def _blocked(self, path: str) -> bool:
        with self._lock:
            hit = any(path.startswith(p) for p in self.prefixes)
            self.cut += hit
        return hit

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                if proxy._blocked(self.path):
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                proxy._wait_if_held(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                conn = http.client.HTTPConnection(*proxy.target, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                self.send_response(answer.status, answer.reason)
                head = self.command == "HEAD"  # keeps the object's own Content-Length
                for key, value in answer.getheaders():
                    if key.lower() not in _HOP and (head or key.lower() != "content-length"):
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
