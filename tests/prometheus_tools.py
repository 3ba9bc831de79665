"""Debian's Prometheus binaries, which `make test` installs; a test that needs a missing one fails saying how to get it."""

import os

import pytest

PROMETHEUS, PUSHGATEWAY, PROMTOOL = "/usr/bin/prometheus", "/usr/bin/prometheus-pushgateway", "/usr/bin/promtool"


def require(binary: str) -> str:
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is missing: apt-get install -y prometheus prometheus-pushgateway")
    return binary
