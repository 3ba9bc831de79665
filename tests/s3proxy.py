"""A loopback HTTP proxy in front of the test S3 server that injects faults on cue: a stopped server, slow answers,
5xx answers, reset connections, replies lost after the server acted, and downloads cut off mid-body.

A fault applies to a bounded number of matching requests (a stop, to a bounded time), after which everything passes
through again; every socket has a timeout, so no client or server can hang the proxy. Loopback only.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from s3server import free_port

KINDS = ("stop", "slow", "error", "reset", "lose-reply", "cut-body")
SOCKET_TIMEOUT = 30
# Request headers that belong to one hop; Expect is answered by the proxy itself.
HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "expect", "te", "upgrade"}
ERROR_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
              b"<Message>injected by the test proxy</Message><RequestId>s3proxy</RequestId></Error>")


@dataclass
class Fault:
    kind: str  # one of KINDS
    method: str = ""  # only requests with this method ("" = any)
    path: str = ""  # only requests whose path (with query) holds this text
    skip: int = 0  # matching requests let through before the fault starts
    count: int = 1  # matching requests it then applies to (a stop: the one that triggers it)
    seconds: float = 0.0  # stop: how long the server stays down (0 = until cleared); slow: delay per request
    matched: int = 0
    injected: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {KINDS}")


def reset(connection: socket.socket) -> None:
    """Close with a TCP reset, as a crashed peer or a dropped connection looks to the client."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()
    except OSError:
        pass


class S3Proxy:
    """The proxy on a free loopback port (`endpoint`), forwarding to the S3 server on `upstream_port`."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.fault: Fault | None = None
        self.connections: set[socket.socket] = set()
        self.server: ThreadingHTTPServer | None = None

    @property
    def running(self) -> bool:
        return self.server is not None

    def start(self) -> None:
        with self.lock:
            if self.server is not None:
                return
            self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
            self.server.daemon_threads, self.server.block_on_close = True, False
            self.server.handle_error = lambda request, address: None  # a cut connection is the point, not news
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def stop(self) -> None:
        """Stop like a crashed server: the port refuses connections and every open connection is reset."""
        with self.lock:
            server, self.server = self.server, None
            connections = list(self.connections)
        if server is None:
            return
        server.shutdown()
        server.server_close()
        for connection in connections:
            try:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def inject(self, fault: Fault) -> Fault:
        """Make `fault` the active one (replacing any other); returns it, to read its counters afterwards."""
        with self.lock:
            self.fault = fault
        return fault

    def clear(self) -> None:
        """No fault any more, and the server up again."""
        with self.lock:
            self.fault = None
        self.start()

    def _take(self, method: str, path: str) -> Fault | None:
        """The fault this request gets, if any."""
        with self.lock:
            fault = self.fault
            if fault is None or (fault.method and method != fault.method) or fault.path not in path:
                return None
            fault.matched += 1
            if fault.matched <= fault.skip or fault.injected >= fault.count:
                return None
            fault.injected += 1
            return fault

    def _stop_for(self, seconds: float) -> None:
        self.stop()
        if seconds:
            timer = threading.Timer(seconds, self.start)
            timer.daemon = True
            timer.start()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = SOCKET_TIMEOUT

            def setup(self):
                super().setup()
                with proxy.lock:
                    proxy.connections.add(self.connection)

            def finish(self):
                with proxy.lock:
                    proxy.connections.discard(self.connection)
                try:
                    super().finish()
                except OSError:
                    pass  # reset by the proxy itself

            def log_message(self, *args):
                pass

            def read_body(self) -> bytes:
                """The request body as sent (chunked bodies stay chunked)."""
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = bytearray()
                while True:
                    line = self.rfile.readline()
                    raw += line
                    if int(line.split(b";")[0].strip() or b"0", 16) == 0:
                        break
                    raw += self.rfile.read(int(line.split(b";")[0].strip(), 16) + 2)
                while line not in (b"\r\n", b"\n", b""):  # trailers, then the blank line
                    line = self.rfile.readline()
                    raw += line
                return bytes(raw)

            def forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=SOCKET_TIMEOUT)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                    return response.status, response.reason, response.getheaders(), data
                finally:
                    upstream.close()

            def reply(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes,
                      cut: bool = False) -> None:
                lines = [f"HTTP/1.1 {status} {reason}"]
                lines += [f"{k}: {v}" for k, v in headers
                          if k.lower() not in ("transfer-encoding", "connection", "keep-alive", "content-length")]
                if self.command == "HEAD":
                    length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                else:
                    length = str(len(data))
                lines.append(f"Content-Length: {length}")
                payload = b"" if self.command == "HEAD" else data
                self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
                                 + (payload[: len(payload) // 2] if cut else payload))

            def handle_request(self):
                body = self.read_body()
                fault = proxy._take(self.command, self.path)
                kind = fault.kind if fault else None
                if kind in ("stop", "reset"):
                    self.close_connection = True
                    reset(self.connection)
                    if kind == "stop":
                        proxy._stop_for(fault.seconds)
                    return
                if kind == "error":
                    self.reply(503, "Service Unavailable", [("Content-Type", "application/xml")],
                               b"" if self.command == "HEAD" else ERROR_BODY)
                    return
                if kind == "slow":
                    time.sleep(fault.seconds)
                status, reason, headers, data = self.forward(body)
                if kind == "lose-reply" or (kind == "cut-body" and len(data) < 2):
                    self.close_connection = True
                    reset(self.connection)
                    return
                self.reply(status, reason, headers, data, cut=kind == "cut-body")
                if kind == "cut-body":
                    self.close_connection = True
                    reset(self.connection)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_request

        return Handler
