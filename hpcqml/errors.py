"""The suite's exceptions.

Kernels raise these (or plain ``ValueError``/``ArithmeticError``); only the CLI maps them to
exit codes: :class:`UserError` (bad input, exit 2) and everything else (exit 1, a failure of
the computation or the machine). A diverged solver or a non-finite product is not bad input.
"""


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
    script requeues.
    """
