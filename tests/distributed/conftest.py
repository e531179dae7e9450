"""Fixtures for the multi-process tests: the e2e corpus and environment, and free ports."""

import socket

from tests.e2e.conftest import cache_env, corpus, kiln_env  # noqa: F401  (re-exported fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
