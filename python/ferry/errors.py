"""ferry's exceptions: one class per kind of engine error, each also a subclass of the
built-in exception a Python caller would expect. The engine's causes are chained as
``__cause__``."""


class Error(Exception):
    """Base of every exception ferry raises."""

    kind = "error"


class InvalidInput(Error, ValueError):
    """A malformed or out-of-range argument or configuration, a stale handle."""

    kind = "invalid_input"


class Unsupported(Error, NotImplementedError):
    """Not in this build or on this host: a feature not compiled in, a missing device."""

    kind = "unsupported"


class Unreachable(Error, ConnectionError):
    """The peer cannot be reached or went away, or the engine is shut down."""

    kind = "unreachable"


class Rejected(Error, RuntimeError):
    """The peer or the device refused: a request, a registration, tasks that failed."""

    kind = "rejected"


class TimedOut(Error, TimeoutError):
    """A deadline passed."""

    kind = "timed_out"


class IoError(Error, OSError):
    """A local failure: a socket, an allocation, a device that could not be opened."""

    kind = "io"


__all__ = [
    "Error",
    "InvalidInput",
    "Unsupported",
    "Unreachable",
    "Rejected",
    "TimedOut",
    "IoError",
]
