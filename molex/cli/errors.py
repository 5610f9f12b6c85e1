"""The error every ``molex-*`` command reports as one line: a problem with the command line or its data."""

from __future__ import annotations

__all__ = ["CLIError"]


class CLIError(ValueError):
    """A user-facing problem with the command line or the data it names.

    A ``ValueError``, so code that calls the functions behind the commands can catch it as one.
    """
