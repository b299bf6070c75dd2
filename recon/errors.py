"""Errors that the CLI reports as one line and an exit code, without a traceback."""

from __future__ import annotations


class ReconError(Exception):
    """A problem the user can fix (bad input, missing weights, bad flag); ``exit_code`` goes to the shell."""

    exit_code = 2


class InputError(ReconError):
    """An input file that cannot be used; the message names the file and the problem."""


class WeightsNotFoundError(ReconError):
    """Model weights were not found; the message lists where they were looked for and how to provide them."""

    exit_code = 3


class TrainingDivergedError(ReconError):
    """The optimisation produced NaN/inf and could not recover."""

    exit_code = 4
