"""Domain errors. Each message says what was given and what is accepted; the CLI exits with code 2 on them
and the service maps them to HTTP 4xx (one handler, ``bitplan.service.api.errors``)."""

from __future__ import annotations


class BitplanError(ValueError):
    """Base class for errors in the caller's input; ``param`` names the offending job option when known."""

    status = 422  # the HTTP status the service answers with
    code = "invalid_input"  # a stable code for callers
    default_param: str | None = None  # the job option this kind of error is about, when there is one

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param if param is not None else self.default_param


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
