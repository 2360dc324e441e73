"""The error every config module raises (its own module, so none of them imports another
to raise it)."""


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message says which and why."""
