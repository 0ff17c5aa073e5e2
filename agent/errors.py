"""Errors that carry a message meant for a person, so the CLI can print one line, no traceback."""


class AgentError(Exception):
    """Base for errors whose message is complete and actionable on its own."""


class ModelUnavailable(AgentError):
    """The model files cannot be had (token, licence, network, missing file)."""


class BadInput(AgentError):
    """A user-supplied file or value is unusable."""


class VoiceNotFound(BadInput):
    """A voice name that is not among the installed voices."""
