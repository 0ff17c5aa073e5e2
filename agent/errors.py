"""Errors that carry a message meant for a person, so the CLI can print one line, no traceback."""


class AgentError(Exception):
    """Base for errors whose message is complete and actionable on its own."""


class ModelUnavailable(AgentError):
    """The model files cannot be had (token, licence, network, missing file)."""


class BadInput(AgentError):
    """A user-supplied file or value is unusable."""


class VoiceNotFound(BadInput):
    """A voice name that is not among the installed voices."""


class CallRefused(AgentError):
    """A call that cannot be taken; `code` maps to SIP/HTTP answers at the endpoint. Here, not in
    the scheduler that raises it, so admission (and the unit tests) name it without torch."""

    def __init__(self, reason: str, code: str, retry_after: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.code = code  # "busy", "draining", "unavailable"
        self.retry_after = retry_after
