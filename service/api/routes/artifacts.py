"""``/v1/artifacts``: a succeeded job's artifacts, their manifest and files (ETag: sha256; byte ranges). Files come
from the data folder, or stream from the object store (``?redirect=presigned``: a 307 to a presigned URL)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, RedirectResponse

from bitplan.errors import ArtifactError
from bitplan.service.api.deps import Files, Owner, Store, own_job
from bitplan.service.api.errors import ERRORS, http_error
from bitplan.service.api.ranges import object_response
from bitplan.service.domain import Job, JobStatus, JobStore
from bitplan.service.objects import ObjectNotFound
from bitplan.service.retention import delete_artifact
from bitplan.service.schemas import ArtifactFile, ArtifactPublic
from bitplan.service.storage import ArtifactListing, Storage

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"], responses=ERRORS)
FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS, 200: {"content": {"application/octet-stream": {}}, "description": "the file (ETag: its sha256)"},
    206: {"content": {"application/octet-stream": {}}, "description": "the requested byte range"},
    304: {"description": "If-None-Match named the file's current ETag"},
    307: {"description": "?redirect=presigned with an object store: the file's presigned URL (Location)"}}


def own_artifact(artifact_id: str, owner: str, store: JobStore) -> Job:
    """The succeeded job of the caller's published artifact, or a 404."""
    job_id, _, index = artifact_id.rpartition("-")
    if not job_id or not index.isdigit():
        raise http_error(404, f"no artifact {artifact_id!r}")
    job = own_job(job_id, owner, store)
    if job.status != JobStatus.SUCCEEDED or artifact_id not in {a.id for a in job.outcome().artifacts}:
        raise http_error(404, f"no artifact {artifact_id!r}")
    return job


def _listing(files: Storage, artifact_id: str, job: Job) -> ArtifactListing:
    """The artifact's manifest and files (a 404 when its files are gone, e.g. deleted behind the service)."""
    try:
        return files.listing(artifact_id, job.attempt)
    except (ObjectNotFound, ArtifactError, FileNotFoundError):
        raise http_error(404, f"artifact {artifact_id!r} has no files in this service's store") from None


@router.delete("/{artifact_id}", status_code=204, response_class=Response)
def delete_artifact_route(artifact_id: str, owner: Owner, store: Store, files: Files) -> Response:
    """Delete one artifact (its files and their space); its job and the job's other artifacts stay."""
    own_artifact(artifact_id, owner, store)
    delete_artifact(store, files, artifact_id.rpartition("-")[0], artifact_id)
    return Response(status_code=204)


@router.get("/{artifact_id}", response_model=ArtifactPublic)
def get_artifact(artifact_id: str, owner: Owner, store: Store, files: Files) -> ArtifactPublic:
    listing = _listing(files, artifact_id, own_artifact(artifact_id, owner, store))
    return ArtifactPublic(id=artifact_id, job_id=artifact_id.rpartition("-")[0], manifest=listing.manifest.to_dict(),
                          files=[ArtifactFile(name=name, bytes=listing.sizes[name], sha256=digest)
                                 for name, digest in listing.digests.items()])


@router.head("/{artifact_id}/files/{name}", responses=FILE_RESPONSES, response_class=FileResponse,
             operation_id="head_artifact_file")
@router.get("/{artifact_id}/files/{name}", responses=FILE_RESPONSES, response_class=FileResponse,
            operation_id="get_artifact_file")
def artifact_file(artifact_id: str, name: str, request: Request, owner: Owner, store: Store, files: Files,
                  if_none_match: str | None = Header(default=None),
                  redirect: str | None = Query(default=None, pattern="^presigned$", description=(
                      "'presigned': answer 307 with a presigned URL of the object store (where the service has "
                      "one; a service that keeps its files in a folder serves the file itself)"))) -> Response:
    job = own_artifact(artifact_id, owner, store)
    listing = _listing(files, artifact_id, job)
    if name not in listing.digests:  # only files the manifest lists: no path tricks
        raise http_error(404, f"artifact {artifact_id!r} has no file {name!r}")
    digest = listing.digests[name]
    etag = f'"{digest}"'
    if if_none_match is not None and (if_none_match.strip() == "*"
                                      or etag in [t.strip() for t in if_none_match.split(",")]):
        return Response(status_code=304, headers={"ETag": etag})
    headers = {"ETag": etag, "X-Checksum-Sha256": digest}
    if files.objects is None:
        return FileResponse(files.folder(artifact_id) / name, media_type="application/octet-stream", filename=name,
                            headers=headers)
    key = files.prefix(artifact_id, job.attempt) + name
    if redirect == "presigned":
        url = files.objects.presigned_url(key, expires_s=3600)
        if url is not None:
            return RedirectResponse(url, status_code=307, headers=headers)
    return object_response(files.objects, key, size=listing.sizes[name], name=name, headers=headers,
                           range_header=request.headers.get("range"), head=request.method == "HEAD")
