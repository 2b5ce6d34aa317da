"""Errors that the command line reports in one line (no traceback), exiting non-zero."""


class UserError(Exception):
    """Bad input from the user: the message names the bad value and the valid choices."""


class ConfigError(UserError, ValueError):
    """An invalid config value."""


class AssetError(UserError, FileNotFoundError):
    """A missing or corrupt model, data set or package."""
