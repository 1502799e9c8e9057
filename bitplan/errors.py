"""Domain errors. Each message says what was given and what is accepted; the CLI exits with code 2 on them
and the service maps them to HTTP 4xx."""


class BitplanError(ValueError):
    """Base class for errors in the caller's input."""


class ModelReferenceError(BitplanError):
    """The model reference is unknown, missing, unsafe (pickle) or of an unsupported architecture."""


class BudgetError(BitplanError):
    """The budget is outside what the candidate bit widths can reach."""


class ArtifactError(BitplanError):
    """An artifact is missing, incomplete or fails its checksum."""
