"""User-facing errors: one clear message, mapped to an exit code by the CLI."""

from __future__ import annotations


class BmadError(Exception):
    """An error the user can fix; the CLI prints its message without a traceback.

    ``exit_code`` 2 marks usage errors (bad names, missing folders, bad input files),
    1 everything else.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class UsageError(BmadError):
    """Bad command-line input or bad input data (exit code 2)."""

    exit_code = 2


class DataError(UsageError):
    """An input file or folder is missing, empty or malformed (exit code 2)."""


class WeightsError(BmadError):
    """Pretrained weights were asked for but cannot be found offline."""

    exit_code = 2
