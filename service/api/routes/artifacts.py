"""``/v1/artifacts``: a succeeded job's artifacts, their manifest and files (ETag: sha256; byte ranges)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Header, Response
from fastapi.responses import FileResponse

from bitplan.manifest import MANIFEST, read_manifest
from bitplan.service.api.deps import Owner, Settings, Store, own_job
from bitplan.service.api.errors import ERRORS, http_error
from bitplan.service.domain import JobStatus, JobStore
from bitplan.service.retention import artifact_folder, delete_artifact
from bitplan.service.schemas import ArtifactFile, ArtifactPublic

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"], responses=ERRORS)
FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS, 200: {"content": {"application/octet-stream": {}}, "description": "the file (ETag: its sha256)"},
    206: {"content": {"application/octet-stream": {}}, "description": "the requested byte range"},
    304: {"description": "If-None-Match named the file's current ETag"}}


def own_artifact(artifact_id: str, owner: str, store: JobStore, data_dir: Path) -> Path:
    """The folder of the caller's published artifact, or a 404."""
    job_id, _, index = artifact_id.rpartition("-")
    if not job_id or not index.isdigit():
        raise http_error(404, f"no artifact {artifact_id!r}")
    job = own_job(job_id, owner, store)
    if job.status != JobStatus.SUCCEEDED or artifact_id not in {a.id for a in job.outcome().artifacts}:
        raise http_error(404, f"no artifact {artifact_id!r}")
    return artifact_folder(data_dir, artifact_id)


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file the manifest lists, and of the manifest itself."""
    digests = dict(read_manifest(folder, verify=False).files)
    digests[MANIFEST] = hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest()
    return digests


@router.delete("/{artifact_id}", status_code=204, response_class=Response)
def delete_artifact_route(artifact_id: str, owner: Owner, store: Store, settings: Settings) -> Response:
    """Delete one artifact (its files and disk space); its job and the job's other artifacts stay."""
    own_artifact(artifact_id, owner, store, settings.data_dir)
    delete_artifact(store, settings.data_dir, artifact_id.rpartition("-")[0], artifact_id)
    return Response(status_code=204)


@router.get("/{artifact_id}", response_model=ArtifactPublic)
def get_artifact(artifact_id: str, owner: Owner, store: Store, settings: Settings) -> ArtifactPublic:
    folder = own_artifact(artifact_id, owner, store, settings.data_dir)
    manifest = read_manifest(folder, verify=False)
    files = [ArtifactFile(name=name, bytes=(folder / name).stat().st_size, sha256=digest)
             for name, digest in _digests(folder).items()]
    return ArtifactPublic(id=artifact_id, job_id=artifact_id.rpartition("-")[0], manifest=manifest.to_dict(),
                          files=files)


@router.head("/{artifact_id}/files/{name}", responses=FILE_RESPONSES, response_class=FileResponse,
             operation_id="head_artifact_file")
@router.get("/{artifact_id}/files/{name}", responses=FILE_RESPONSES, response_class=FileResponse,
            operation_id="get_artifact_file")
def artifact_file(artifact_id: str, name: str, owner: Owner, store: Store, settings: Settings,
                  if_none_match: str | None = Header(default=None)) -> Response:
    folder = own_artifact(artifact_id, owner, store, settings.data_dir)
    digests = _digests(folder)
    if name not in digests:  # only files the manifest lists: no path tricks
        raise http_error(404, f"artifact {artifact_id!r} has no file {name!r}")
    etag = f'"{digests[name]}"'
    if if_none_match is not None and (if_none_match.strip() == "*"
                                      or etag in [t.strip() for t in if_none_match.split(",")]):
        return Response(status_code=304, headers={"ETag": etag})
    return FileResponse(folder / name, media_type="application/octet-stream", filename=name,
                        headers={"ETag": f'"{digests[name]}"', "X-Checksum-Sha256": digests[name]})
