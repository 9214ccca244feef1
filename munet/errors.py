"""Errors that carry a message meant for the user: the CLI prints them without a traceback."""


class MunetError(Exception):
    """A user-facing error: bad input, missing data or weights, invalid configuration."""


class ConfigError(MunetError):
    """A configuration value is unknown or outside its allowed range."""


class DataError(MunetError):
    """A data source is missing, unreadable, corrupt or inconsistent."""


class TaskUnavailable(DataError):
    """A registered task cannot be loaded on this machine (e.g. its package is not installed)."""


class WeightsError(MunetError):
    """A weights file is missing, altered (hash mismatch) or does not fit the expected architecture."""


class StoreError(MunetError):
    """A run directory is missing, corrupt, from an incompatible version, or in use by another process."""


class ExportError(MunetError):
    """A path cannot be exported, or an export directory cannot be loaded."""
