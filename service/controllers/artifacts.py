"""Artifacts of a succeeded job: the list, and each file streamed with its sha256 as ETag (or, from an S3
store configured to presign, a redirect to a short-lived URL)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, get
from litestar.openapi import ResponseSpec
from litestar.params import Parameter
from litestar.response import Redirect, Stream

from hoppatch.report_page import CONTENT_SECURITY_POLICY

from .. import jobs
from ..deps import Services
from ..problems import ArtifactNotFound
from ..schemas import ArtifactList
from .jobs import COMMON, problems


class ArtifactController(Controller):
    path = "/v1/jobs/{job_id:str}/artifacts"
    tags = ["artifacts"]
    security = [{"ApiKey": []}]

    @get("/", operation_id="ListArtifacts", sync_to_thread=True, responses=problems(*COMMON, 404))
    def list_artifacts(self, request: Request, services: Services, job_id: str) -> ArtifactList:
        """What the job published (empty until it has succeeded)."""
        record = jobs.get_job(services.store, request.user, job_id)
        return ArtifactList(record.result.artifacts if record.result else [])

    @get(
        "/{name:path}",
        operation_id="GetArtifact",
        sync_to_thread=True,
        responses={
            **problems(*COMMON, 404),
            304: ResponseSpec(None, description="Not modified: the ETag matches"),
            307: ResponseSpec(None, description="Fetch it from the presigned URL in Location (S3 stores configured to presign)"),
        },
        response_description="The artifact's bytes",
    )
    def get_artifact(
        self,
        request: Request,
        services: Services,
        job_id: str,
        name: str,
        if_none_match: Annotated[str | None, Parameter(header="If-None-Match", max_length=256)] = None,
    ) -> Response | Stream | Redirect:
        """Download one artifact; `If-None-Match` with its sha256 answers 304."""
        record = jobs.get_job(services.store, request.user, job_id)
        name = name.lstrip("/")
        info = next((a for a in (record.result.artifacts if record.result else []) if a.name == name), None)
        if info is None:
            raise ArtifactNotFound(f"job {job_id} has no artifact {name!r}")
        etag = {"ETag": f'"{info.sha256}"'}
        if if_none_match and info.sha256 in {t.strip().strip('"').removeprefix("W/").strip('"') for t in if_none_match.split(",")}:
            return Response(content=b"", status_code=304, headers=etag)
        if url := services.artifacts.download_url(job_id, name):
            return Redirect(url, status_code=307, headers=etag)
        chunks = services.artifacts.chunks(job_id, name)
        if chunks is None:
            raise ArtifactNotFound(f"job {job_id} has no artifact {name!r}")
        inline = info.media_type.startswith(("text/html", "image/"))
        headers = {
            **etag,
            "Content-Length": str(info.size_bytes),
            "Content-Disposition": f'{"inline" if inline else "attachment"}; filename="{name.rsplit("/", 1)[-1]}"',
            "X-Content-Type-Options": "nosniff",
        }
        if info.media_type.startswith("text/html"):  # the report: shown inline, with no script and nothing fetched
            headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return Stream(chunks, media_type=info.media_type, headers=headers)
