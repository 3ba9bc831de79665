"""A real S3 HTTP server (moto) on loopback for the tests, with the AWS environment pointing at it."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import urllib.request
from typing import Callable

import boto3
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

BUCKET = "sspo-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # botocore's own retries would hide a stopped server for seconds; sspo's retry helper is under test instead
    "AWS_MAX_ATTEMPTS": "1",
    "SSPO_STORAGE_ATTEMPTS": "3",
    "SSPO_STORAGE_RETRY_DELAY": "0.05",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CrashableMotoServer(ThreadedMotoServer):
    """moto's threaded server whose stop() behaves like a crash: the listening socket is closed and every open
    (keep-alive) connection is cut, so clients see refused and reset connections; start() serves the same
    in-process state again on the same port.

    stop(keep_accepting=True) leaves something on the port that accepts connections and drops them at once, as a
    proxy or load balancer in front of a dead server does. crash_after() crashes right after a chosen answer.
    """

    def __init__(self, ip_address: str, port: int):
        super().__init__(ip_address=ip_address, port=port, verbose=False)
        self.connections: set[socket.socket] = set()
        self.dropper: tuple[socket.socket, threading.Thread] | None = None
        self.crash_trigger: tuple[Callable[[str, str], bool], Callable[[], None]] | None = None
        self.trigger_lock = threading.Lock()

    def crash_after(self, request: Callable[[str, str], bool], crash: Callable[[], None]) -> None:
        """Call crash() in the handler, right after answering the first request(method, path) that holds."""
        self.crash_trigger = (request, crash)

    def _server_entry(self) -> None:
        connections, server = self.connections, self

        class TrackedHandler(MotoRequestHandler):
            def setup(self):
                super().setup()
                connections.add(self.connection)

            def finish(self):
                connections.discard(self.connection)
                super().finish()

            def handle_one_request(self):
                super().handle_one_request()
                with server.trigger_lock:
                    trigger = server.crash_trigger
                    if trigger is None or not trigger[0](getattr(self, "command", ""), getattr(self, "path", "")):
                        return
                    server.crash_trigger = None
                trigger[1]()  # the answer is out already: the handler's socket writes are unbuffered

        self._server = make_server(self._ip_address, self._port, DomainDispatcherApplication(create_backend_app),
                                   True, request_handler=TrackedHandler)
        self._server_ready_event.set()
        self._server.serve_forever(poll_interval=0.01)  # stop() takes effect at once, not after half a second

    def start(self) -> None:
        if self.dropper is not None:
            listener, thread = self.dropper
            listener.shutdown(socket.SHUT_RDWR)  # wakes its accept(); a close() alone would leave the port taken
            thread.join()
            listener.close()
            self.dropper = None
        super().start()

    def stop(self, keep_accepting: bool = False) -> None:
        super().stop()
        self._server.server_close()
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler
        if keep_accepting:
            listener = socket.create_server((self._ip_address, self._port))
            self.dropper = (listener, threading.Thread(target=drop_connections, args=(listener,), daemon=True))
            self.dropper[1].start()


def drop_connections(listener: socket.socket) -> None:
    """Accept connections and close them at once, until the listener is closed."""
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        connection.close()


class S3Server:
    def __init__(self):
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = CrashableMotoServer("127.0.0.1", self.port)
        self.running = False

    def start(self) -> None:
        self.server.start()
        self.running = True

    def stop(self, keep_accepting: bool = False) -> None:
        self.server.stop(keep_accepting)
        self.running = False

    def crash_after(self, request: Callable[[str, str], bool], keep_accepting: bool = False) -> None:
        """Crash right after answering the first request(method, path) that holds (stop(keep_accepting))."""
        self.server.crash_after(request, lambda: self.stop(keep_accepting))

    @contextlib.contextmanager
    def reject_credentials(self):
        """Within the block the server refuses every request as S3 refuses unknown credentials (403): moto checks
        signatures once its count of initial unauthenticated actions, set through its API here, is used up."""
        def set_count(count: bytes) -> None:
            # not form-encoded: moto reads the raw body
            request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=count,
                                             headers={"Content-Type": "text/plain"}, method="POST")
            urllib.request.urlopen(request).close()

        set_count(b"0")
        try:
            yield
        finally:
            set_count(b"inf")

    def env(self) -> dict:
        return {**AWS_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def ensure_bucket(self, name: str = BUCKET) -> str:
        client = self.client()
        if name not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
            client.create_bucket(Bucket=name)
        return name


def apply_env(env: dict) -> dict:
    """Set `env` in os.environ; returns what to restore."""
    previous = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    return previous


def restore_env(previous: dict) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
