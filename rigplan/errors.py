"""RigplanError and its subclasses: what library code raises instead of printing or exiting.

Imports nothing. The CLI catches these, prints the one-line message and exits with 2.
"""


class RigplanError(Exception):
    """A problem the user can fix; the message says what is wrong, then what to do."""


class UnknownModelError(RigplanError):
    """The model id, alias, path or config.json is not one rigplan can read."""


class UnknownGpuError(RigplanError):
    """The GPU id or name is not in the catalogue."""


class ConfigError(RigplanError):
    """A setting is out of range (batch <= 0, seq longer than the context, ...)."""


class DataError(RigplanError):
    """The training data has problems; the message names file and line."""


class CalibrationError(RigplanError):
    """A calibration file or probe could not be used."""


def require(problems: list[str]) -> None:
    """One ConfigError naming every problem, gathered before anything runs (as litgpt's validate_args); each
    problem says what is wrong, then what to do."""
    if problems:
        raise ConfigError("; ".join(problems))
