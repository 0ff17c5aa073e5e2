"""The torch thread rule for layers that run engines in this process (tests/engine, tests/e2e)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def torch_threads():
    """In-process engines run with the server's thread rule (agent/model/threads.py), so the
    real-time scheduler tests see the timing a server on this machine has. Not in the root
    conftest: tests/unit imports no torch."""
    from agent.model.threads import configure_torch_threads

    configure_torch_threads()
