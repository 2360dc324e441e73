"""The error every config module raises (its own module, so none of them imports another
to raise it)."""

from moe.errors import BadConfig


class ConfigError(BadConfig):
    """A configuration value or key is invalid; the message says which and why."""
