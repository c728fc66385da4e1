"""Errors that reach the user as one line (no traceback unless ``--debug``)."""


class UserError(Exception):
    """Bad input or configuration: the message names the cause in one line."""


class ConfigError(UserError):
    """A run configuration key, type or value is not allowed."""


class NumericalError(UserError):
    """A computation produced NaN/Inf or failed to converge."""
