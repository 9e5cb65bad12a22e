"""One exception tree for immunoprofile, with stable codes and exit codes.

Every error a user can cause is an :class:`ImmunoprofileError`. Its message names
the file (when there is one), says what is wrong and what to do. ``code`` is a
stable, machine-readable string (written to ``failures.csv``); ``exit_code`` is
what the CLI returns when the error ends a command.

Non-fatal problems are :class:`Finding` records: the input was still processed
correctly, but a reviewer should know.
"""

from __future__ import annotations

from dataclasses import dataclass

# Exit codes (documented in README.md, tested in tests/test_cli.py).
EXIT_OK = 0
EXIT_SAMPLES_FAILED = 1
EXIT_USAGE = 2
EXIT_ABORTED = 3
EXIT_INTERRUPTED = 130


class ImmunoprofileError(Exception):
    """Base class of every error immunoprofile raises on purpose.

    Parameters
    ----------
    message
        What is wrong, in words a scientist can act on.
    path
        The file concerned, if any; it is prefixed to the message.
    hint
        What to do about it; appended to the message.
    code
        Overrides the class's stable code.
    """

    code: str = "ERROR"
    exit_code: int = EXIT_USAGE

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        hint: str | None = None,
        code: str | None = None,
    ) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        self.hint = hint
        if code is not None:
            self.code = code
        super().__init__(str(self))

    def __str__(self) -> str:
        text = self.message
        if self.path:
            text = f"{self.path}: {text}"
        if self.hint:
            text = f"{text.rstrip('.')}; {self.hint}"
        return text


class UsageError(ImmunoprofileError):
    """Bad command-line arguments or options."""

    code = "USAGE"


class InputFileError(ImmunoprofileError):
    """An input file is missing or cannot be read."""

    code = "FILE_MISSING"


class FcsError(ImmunoprofileError):
    """An FCS file violates the FCS standard or cannot be read correctly.

    Codes start with ``FCS_`` (see :mod:`immunoprofile.fcs`).
    """

    code = "FCS_INVALID"
    exit_code = EXIT_SAMPLES_FAILED


class TemplateError(ImmunoprofileError):
    """A gating template is missing, malformed or inconsistent."""

    code = "TEMPLATE_INVALID"


class SampleSheetError(ImmunoprofileError):
    """A sample sheet is malformed."""

    code = "SHEET_INVALID"


class SampleError(ImmunoprofileError):
    """A single sample cannot be processed (the batch goes on without it)."""

    code = "SAMPLE_FAILED"
    exit_code = EXIT_SAMPLES_FAILED


class MarkerError(SampleError):
    """A marker named by the template is missing from, or ambiguous in, a file."""

    code = "MARKER_NOT_FOUND"


class CompensationError(SampleError):
    """The compensation matrix cannot be found or applied."""

    code = "COMPENSATION_INVALID"


class ControlMissingError(SampleError):
    """A gate needs an FMO control that the sample sheet does not provide."""

    code = "FMO_MISSING"


class GatingError(SampleError):
    """A gate cannot be computed on a sample."""

    code = "GATING_FAILED"


class ResultsError(ImmunoprofileError):
    """A results folder or database is missing, incomplete or of another kind."""

    code = "RESULTS_INVALID"


class AbortedError(ImmunoprofileError):
    """A run was aborted as a whole (lock held, disk full, too many failures)."""

    code = "ABORTED"
    exit_code = EXIT_ABORTED


@dataclass(frozen=True)
class Finding:
    """A non-fatal observation about an input, kept with the results.

    Attributes
    ----------
    code
        Stable, machine-readable code (e.g. ``FCS_ENDDATA_OFF_BY_ONE``).
    message
        Human-readable explanation.
    severity
        ``"info"`` or ``"warning"``.
    """

    code: str
    message: str
    severity: str = "warning"
