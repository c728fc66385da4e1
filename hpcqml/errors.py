"""The suite's exceptions.

Kernels raise these (or plain ``ValueError``/``ArithmeticError``); only the CLI maps them to
exit codes: :class:`UserError` (bad input, exit 2) and everything else (exit 1, a failure of
the computation or the machine). A diverged solver or a non-finite product is not bad input.
"""
from collections.abc import Callable


class UserError(ValueError):
    """Bad input or configuration: the message names the cause in one line (exit 2)."""


class ConfigError(UserError):
    """A run configuration key, type or value is not allowed."""


class InputFileError(UserError):
    """A file the suite was asked to read is missing, damaged, hostile or of the wrong kind."""


class NumericalError(ArithmeticError):
    """A computation produced NaN/Inf or failed to converge (exit 1, not bad input)."""


class StoppedBySignal(UserError):
    """A run stopped on a scheduler or user signal after its resume state reached disk.

    Raised on every rank together; the message says what was saved and whether the job
    script requeues. ``recompose``, when given, words the message again from what is
    known later (a cancel noted after the wall-time warning means no requeue):
    :meth:`final` is what the CLI prints and the results file records.
    """

    def __init__(self, message: str, recompose: "Callable[[], str] | None" = None) -> None:
        super().__init__(message)
        self._recompose = recompose

    def final(self) -> str:
        """The message as of now (re-worded by ``recompose`` when there is one)."""
        return self._recompose() if self._recompose is not None else str(self)
