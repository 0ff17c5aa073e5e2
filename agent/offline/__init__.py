"""Offline evaluation (the upstream `moshi.offline` equivalent)."""
