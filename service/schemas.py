"""HTTP schemas (pydantic v2), in one place."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Health(BaseModel):
    status: str
    version: str


class JobCreate(BaseModel):
    """A quantization job: a model reference and one budget (several bits-per-weight budgets make a sweep)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=4096, description="bundled id, or a path under an allowed root")
    bits_per_weight: float | list[float] | None = Field(
        default=None, description="effective bits per weight (scales and zeros counted); a list is a sweep")
    bytes: int | None = Field(default=None, gt=0, le=2**50, description="budget in bytes of the quantized layers")
    uniform_bits: int | None = Field(default=None, ge=1, le=8, description="uniform baseline")
    metric: str = "auto"
    solver: str = "auto"
    candidate_bits: list[int] = Field(default=[2, 3, 4, 8], min_length=1, max_length=8)
    group_size: int = Field(default=128, ge=8, le=4096)
    num_samples: int = Field(default=32, ge=1, le=512)
    seq_len: int = Field(default=512, ge=16, le=8192)
    quantizer: Literal["rtn", "rtn-symmetric", "rtn-salience", "gptq", "gptq-salience"] = Field(
        default="rtn", description="rtn, or GPTQ error feedback, with or without salience-weighted ranges")
    mix_groups: bool = Field(default=False, description="column groups of a layer at bits-1/bits/bits+1 (SliM-LLM)")
    kl_refine_windows: int = Field(
        default=0, ge=0, le=64,
        description="re-solve once with each block's measured share of the output KL on this many calibration "
                    "windows, checked on as many others (needs num_samples >= 2x this); 0: off")


class ErrorInfo(BaseModel):
    code: str
    message: str
    retryable: bool


class Progress(BaseModel):
    stage: str | None
    fraction: float
    eta_s: float | None


class ArtifactRef(BaseModel):
    id: str
    bits_per_weight: float
    bytes: int
    manifest_sha256: str


class AllocationSummary(BaseModel):
    bits_per_weight: float
    bytes: int
    status: str
    objective: float | None
    lower_bound: float | None
    kl_divergence: float | None
    bits_histogram: dict[str, int]


class JobPublic(BaseModel):
    id: str
    status: Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
    progress: Progress
    attempt: int
    error: ErrorInfo | None
    artifacts: list[ArtifactRef]
    allocation: list[AllocationSummary]
    request: dict[str, Any]
    created: float
    updated: float


class JobPage(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None


class EventPublic(BaseModel):
    seq: int
    at: float
    kind: str
    data: dict[str, Any]


class EventPage(BaseModel):
    items: list[EventPublic]
    next_after: int


class ArtifactFile(BaseModel):
    name: str
    bytes: int
    sha256: str


class ArtifactPublic(BaseModel):
    id: str
    job_id: str
    manifest: dict[str, Any]
    files: list[ArtifactFile]


class Problem(BaseModel):
    """Every 4xx/5xx body."""

    detail: str


class ModelCreate(BaseModel):
    """Register a model reference: a bundled id, or a path under one of the service's allowed roots."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field(min_length=1, max_length=4096)
    name: str | None = Field(default=None, max_length=200)


class ModelPublic(BaseModel):
    id: str
    name: str | None
    reference: str
    format: str
    bytes: int | None
    created: float
