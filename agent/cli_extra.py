"""Sub-commands added by later layers (personas, serve) register here to keep cli.py small."""

from __future__ import annotations


def register(sub) -> None:
    for mod in ("agent.personas.cli", "agent.server.cli"):
        try:
            module = __import__(mod, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name and mod.startswith(exc.name):
                continue
            raise
        module.register(sub)
