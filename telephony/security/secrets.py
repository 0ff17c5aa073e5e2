"""Secrets come from the environment, named by `*_env` settings, and are never logged.

The minimum strengths live here, with the one way to read a secret, so the server's start
check, `config-check` and the code that uses a secret agree on what is good enough.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: HS256 call-token secrets: one visitor's token allows an offline brute force of the secret,
#: so it must be a random key, not a password (RFC 7518 section 3.2: at least the hash size).
MIN_SIGNING_SECRET_BYTES = 32
#: Bearer tokens the server compares (ops, playground, Telnyx's stream_auth_token).
MIN_BEARER_TOKEN_CHARS = 16


def env_secret(name: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The secret in environment variable `name` (None when unnamed, unset or empty)."""
    if not name:
        return None
    value = (os.environ if env is None else env).get(name)
    return value or None
