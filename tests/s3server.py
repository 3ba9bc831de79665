"""A real S3 HTTP server (moto) on loopback for the tests, with the AWS environment pointing at it."""

from __future__ import annotations

import logging
import os
import socket

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
    in-process state again on the same port."""

    def __init__(self, ip_address: str, port: int):
        super().__init__(ip_address=ip_address, port=port, verbose=False)
        self.connections: set[socket.socket] = set()

    def _server_entry(self) -> None:
        connections = self.connections

        class TrackedHandler(MotoRequestHandler):
            def setup(self):
                super().setup()
                connections.add(self.connection)

            def finish(self):
                connections.discard(self.connection)
                super().finish()

        self._server = make_server(self._ip_address, self._port, DomainDispatcherApplication(create_backend_app),
                                   True, request_handler=TrackedHandler)
        self._server_ready_event.set()
        self._server.serve_forever(poll_interval=0.01)  # stop() takes effect at once, not after half a second

    def stop(self) -> None:
        super().stop()
        self._server.server_close()
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler


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

    def stop(self) -> None:
        self.server.stop()
        self.running = False

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
