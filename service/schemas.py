"""HTTP schemas (pydantic v2), in one place."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from bitplan.service.domain import JobStatus
from bitplan.spec import OPTIONS, Option


class Public(BaseModel):
    """A response model; the Python client returns these (typed: ``job.status``, ``job.progress.eta_s``), and
    they also read as mappings (``job["status"]``, ``job.get("error")``) for code written against plain dicts;
    ``to_dict()`` is the JSON the service sent."""

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in type(self).model_fields

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in type(self).model_fields else default

    def keys(self) -> list[str]:
        return list(type(self).model_fields)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Health(Public):
    status: str
    version: str


def _job_field(option: Option) -> tuple[Any, Any]:
    """The annotation and ``Field`` of one job option. Bounds and choices are documented in the schema and
    enforced by the spec itself, so the API, the CLI and Python callers get the same message."""
    extra: dict[str, Any] = {}
    if option.positive:
        extra["exclusiveMinimum"] = 0
    if option.minimum is not None:
        extra["minimum"] = option.minimum
    if option.maximum is not None:
        extra["maximum"] = option.maximum
    default = option.default
    annotation: Any = {"int": int, "float": float, "bool": bool, "str": str, "enum": str}.get(option.kind)
    if option.kind == "enum" and option.choices is not None:
        extra = {"enum": [c.value for c in option.choices]}
        default = None if default is None else default.value  # None: an optional choice (--size-of)
    elif option.kind in ("ints", "floats"):
        item_type = "integer" if option.kind == "ints" else "number"
        extra = {"items": {"type": item_type, **extra}, **({"maxItems": option.max_items} if option.max_items else {})}
        annotation, default = list[int], list(default)
        if option.kind == "floats":
            annotation, default = float | list[float] | None, None
    elif option.kind == "pins":
        annotation, default = list[str], []
    if default is None and option.kind in ("int", "float", "str", "enum"):
        annotation = annotation | None
    if option.name == "model":
        return str, Field(min_length=1, max_length=4096, description="bundled id, registered model id (mdl-...), or a "
                          "path under an allowed root")
    return annotation, Field(default=default, description=option.help, json_schema_extra=extra or None)


JobCreate = create_model(  # type: ignore[call-overload]
    "JobCreate", __config__=ConfigDict(extra="forbid"),
    __doc__="A quantization job: a model reference and one budget (several bits-per-weight budgets make a sweep). "
            "Generated from the job spec (bitplan.spec.OPTIONS).",
    **{option.name: _job_field(option) for option in OPTIONS if option.http})


class ErrorInfo(Public):
    code: str
    message: str
    retryable: bool


class Progress(Public):
    stage: str | None = Field(description="the stage last reported (load, token Fisher, quantize, quality, ...)")
    fraction: float = Field(description="the share of the job's expected time done (never goes back)")
    eta_s: float | None = Field(description="seconds left, from measured rates: the current stage's time per "
                                "step, and the later stages' durations in the last job of the same kind on that "
                                "worker (else this job's time per share of work so far); null until known")


class ArtifactRef(Public):
    id: str
    bits_per_weight: float
    bytes: int
    manifest_sha256: str


class QualityPublic(Public):
    """Quality against the source model on held-back windows (text the calibration did not see)."""

    kl_mean: float = Field(description="mean per-token KL(source || quantized), nats")
    kl_p99: float = Field(description="99th percentile of the per-token KL, nats")
    ppl: float = Field(description="perplexity of the quantized model")
    ppl_source: float = Field(description="perplexity of the source model on the same windows")
    top1_agreement: float = Field(description="share of tokens whose most likely next token is the source's")
    windows: int
    seq_len: int
    text: str = Field(description="the evaluated text's name")


class AllocationSummary(Public):
    bits_per_weight: float
    bytes: int
    status: str
    objective: float | None
    lower_bound: float | None
    kl_divergence: float | None
    bits_histogram: dict[str, int]
    quality: QualityPublic | None = None
    latency: dict[str, Any] | None = Field(default=None, description="with a latency budget: predicted and measured "
                                           "decode ms per token, the budget, the table used")


class JobPublic(Public):
    id: str
    status: JobStatus
    progress: Progress
    attempt: int
    error: ErrorInfo | None
    artifacts: list[ArtifactRef]
    allocation: list[AllocationSummary]
    request: dict[str, Any]
    created: float
    updated: float


class Page(Public):
    """Every list answers one page in this shape and takes ``?cursor=`` (a previous page's ``next_cursor``) and
    ``?limit=``. ``has_more``: another page has items now; ``next_cursor`` is given exactly then (``null`` at the
    end). A job's events grow at the end: a follower polls again with the last event's ``seq`` as the cursor."""

    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null when has_more is false")
    has_more: bool = Field(description="whether another page has items now")


class JobPage(Page):
    items: list[JobPublic]


class EventPublic(Public):
    seq: int
    at: float
    kind: str
    data: dict[str, Any]


class EventPage(Page):
    items: list[EventPublic]


class ArtifactFile(Public):
    name: str
    bytes: int
    sha256: str


class ArtifactPublic(Public):
    id: str
    job_id: str
    manifest: dict[str, Any]
    files: list[ArtifactFile]


class Problem(BaseModel):
    """Every 4xx/5xx body: RFC 9457 problem details (``application/problem+json``) with a stable ``code`` and
    the offending ``param`` when one is known."""

    type: str = Field(description="a URI naming the kind of problem (urn:bitplan:problem:CODE)")
    title: str = Field(description="the HTTP status phrase")
    status: int
    detail: str = Field(description="what was wrong and what is accepted, for people")
    code: str = Field(description="a stable code for programs (invalid_option, not_found, ...)")
    param: str | None = Field(default=None, description="the request field at fault, when known")


class ModelCreate(BaseModel):
    """Register a model reference: a bundled id, or a path under one of the service's allowed roots."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field(min_length=1, max_length=4096)
    name: str | None = Field(default=None, max_length=200)


class ModelPublic(Public):
    id: str
    name: str | None
    reference: str
    format: str
    bytes: int | None
    created: float


class ModelPage(Page):
    items: list[ModelPublic]


class FrontierPoint(Public):
    """One Pareto-optimal allocation of the predicted frontier."""

    bytes: float
    bits_per_weight: float
    predicted_loss: float = Field(description="predicted loss increase (the allocation's objective)")
    latency_ms: float | None = Field(default=None, description="predicted decode ms per token (axis=latency, and "
                                                               "uniform points of a job with a latency budget)")
    prefill_ms: float | None = Field(default=None, description="predicted prefill ms per prompt token (axis=prefill, "
                                                               "and uniform points of a job with a latency budget)")


class UniformPoint(FrontierPoint):
    """Every unit at one bit width (with formats: the set's first format of that width each shape allows)."""

    label: str
    bits: int
    formats: list[str] | None = None


class MeasuredPoint(Public):
    """An artifact the job wrote, with its measured quality (held-back windows)."""

    artifact: str | None
    bytes: int
    bits_per_weight: float
    predicted_loss: float | None
    status: str | None
    kl_mean: float | None = Field(description="mean per-token KL to the source model, nats (held-back windows)")
    kl_p99: float | None
    ppl: float | None
    ppl_source: float | None
    top1_agreement: float | None
    kl_calibration: float | None = Field(description="the KL check on calibration windows, nats")
    eval_text: str | None
    latency_ms: float | None = Field(default=None, description="predicted decode ms per token (latency budgets)")
    measured_latency_ms: float | None = Field(default=None, description="the GGUF's decode ms per token, timed")
    prefill_ms: float | None = Field(default=None, description="predicted prefill ms per prompt token")
    measured_prefill_ms: float | None = Field(default=None, description="the GGUF's prefill ms per token, timed")


class FrontierPublic(Public):
    """The job's predicted frontier (sorted by bytes, predicted loss non-increasing), its uniform baselines and
    its measured artifacts, all from the allocation problem its artifacts carry (``allocation-problem.json``)."""

    job_id: str
    kind: str = Field(description="exact (every Pareto-optimal allocation) or hull (the convex hull's breakpoints)")
    axis: str = Field(default="bytes", description="what the points are sorted by: bytes, or the predicted decode "
                                                   "(latency) or prefill time")
    numel: int = Field(description="weights in the allocated layers (bits per weight = 8 * bytes / numel)")
    total_points: int = Field(description="points on the whole frontier; ``points`` holds at most ``limit`` of "
                                          "them, evenly spread, the first and the last included")
    points: list[FrontierPoint]
    uniform: list[UniformPoint]
    measured: list[MeasuredPoint]


class ArtifactsCreate(BaseModel):
    """More budgets for a finished job: a new job with the same spec (its sensitivity pass comes from the cache)
    and these budgets."""

    model_config = ConfigDict(extra="forbid")

    bits_per_weight: float | list[float] | None = Field(default=None, description="one or more budgets")
    bytes: int | None = Field(default=None, gt=0, description="a budget in bytes of the quantized layers")


class LatencyTablePublic(Public):
    """An uploaded latency table (``bitplan latency --out FILE`` on the machine that will run the model): a job
    names it by ``id`` in its ``latency_table`` field."""

    id: str
    fingerprint: dict[str, Any]
    model_sha256: str
    types: list[str]
    decode_fixed_ms: float
    decode_ms_per_mweight: dict[str, float]


class LatencyTablePage(Page):
    items: list[LatencyTablePublic]


class LatencyTableUpload(BaseModel):
    """A latency table as ``bitplan latency --out FILE`` writes it."""

    model_config = ConfigDict(extra="forbid")

    fingerprint: dict[str, Any] = Field(description="the machine it was measured on: CPU, threads, versions")
    model_sha256: str = Field(pattern="^[0-9a-f]{64}$")
    types: list[str] = Field(min_length=1, max_length=64)
    decode_fixed_ms: float = Field(ge=0, le=1e6)
    decode_ms_per_mweight: dict[str, float]
    prefill_fixed_ms: float = Field(ge=0, le=1e6)
    prefill_ms_per_mweight: dict[str, float]
    fit: dict[str, Any] = Field(default_factory=dict)
    version: int = 1
    key: str | None = Field(default=None, description="ignored: the service computes it")
