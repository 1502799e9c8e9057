"""Domain errors. Each message says what was given and what is accepted; the CLI exits with its
:class:`ExitCode` and the service maps them to HTTP 4xx (one handler, ``bitplan.service.api.errors``)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """The command line's exit codes (README, "Command line")."""

    OK = 0
    INTERNAL = 1  # a bug: a traceback was printed
    USAGE = 2  # the command line itself (unknown flag, missing argument): argparse's
    BAD_INPUT = 3  # a job option, model reference, budget or artifact the command refused
    UNREACHABLE = 4  # no service answered (or it answered 503 until the retries ran out)
    JOB_FAILED = 5  # the job ran and failed
    JOB_CANCELLED = 6


class BitplanError(ValueError):
    """Base class for errors in the caller's input; ``param`` names the offending job option when known."""

    status = 422  # the HTTP status the service answers with
    code = "invalid_input"  # a stable code for callers
    default_param: str | None = None  # the job option this kind of error is about, when there is one
    exit_code = ExitCode.BAD_INPUT

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param if param is not None else self.default_param
        self.details: dict[str, object] | None = None  # more for a --json error line (the failed job, ...)


class SpecError(BitplanError):
    """A job option is unknown, of the wrong type or outside its range, or options contradict each other."""

    code = "invalid_option"


class ModelReferenceError(BitplanError):
    """The model reference is unknown, missing, unsafe (pickle) or of an unsupported architecture."""

    code = "invalid_model"
    default_param = "model"


class BudgetError(BitplanError):
    """The budget is outside what the candidate bit widths can reach."""

    code = "infeasible_budget"


class ArtifactError(BitplanError):
    """An artifact is missing, incomplete or fails its checksum."""

    code = "invalid_artifact"


class ModelTooLargeError(ModelReferenceError):
    """A model file is over the service's size limit."""

    status = 413
    code = "model_too_large"


class CursorError(BitplanError):
    """A list's ``cursor`` is not a ``next_cursor`` that list gave."""

    status = 400
    code = "invalid_cursor"

    def __init__(self, cursor: str) -> None:
        super().__init__(f"unknown or malformed cursor {cursor!r}; pass next_cursor from the previous page of this "
                         "list", param="cursor")


class ServiceUnreachable(BitplanError):
    """No service answered at the URL (or only with 503 until the client's retries ran out)."""

    code = "service_unreachable"
    exit_code = ExitCode.UNREACHABLE


class JobNotSucceeded(BitplanError):
    """A submitted job ended without succeeding (:class:`JobFailed`, :class:`JobCancelled`): ``job_id``,
    ``job_status`` (``"failed"``, ``"cancelled"``) and the job's own ``error_message`` (empty when it gave none).
    ``status`` stays the HTTP status, as on every :class:`BitplanError`."""

    def __init__(self, message: str, *, job_id: str | None = None, job_status: str | None = None,
                 error_message: str = "") -> None:
        super().__init__(message)
        self.job_id, self.job_status, self.error_message = job_id, job_status, error_message


class JobFailed(JobNotSucceeded):
    """A submitted job ended failed."""

    code = "job_failed"
    exit_code = ExitCode.JOB_FAILED


class JobCancelled(JobNotSucceeded):
    """A submitted job ended cancelled."""

    code = "job_cancelled"
    exit_code = ExitCode.JOB_CANCELLED
