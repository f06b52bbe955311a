"""/api/v1/datasets: upload (validated row by row), list, get, delete training datasets kept in the JetStream
object store, so that `POST /training/start {"datasetId": ...}` needs no disk shared with the trainers.

Uploads may be larger than other request bodies: `upload_request_class()` gives the upload routes of both
apps (this one and /v1/files) their own limit, `CY_LLM_MAX_DATASET_BYTES`.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Request, Response, request

from gateway.api_v1.training import iso
from gateway.core import GatewayCore
from gateway.http_json import json_response
from schemas.errors import invalid
from services.training.dataset_store import DatasetInfo

# Content types of a raw (non-multipart) upload body; any other is refused, so a form post is never
# mistaken for a dataset.
RAW_TYPES = frozenset(
    {"application/jsonl", "application/x-ndjson", "application/json", "application/x-jsonlines", "text/plain", ""}
)


def upload_request_class(upload_paths: frozenset[str], limit: int) -> type[Request]:
    """A Request whose body limit is `limit` on a POST to one of `upload_paths` (the app's
    MAX_CONTENT_LENGTH everywhere else). Quart fixes a body's limit when it builds the request, before
    routing: this is the one place a route can get a different one."""

    class UploadRequest(Request):
        def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
            if method == "POST" and path in upload_paths:
                kwargs["max_content_length"] = limit
            super().__init__(method, scheme, path, *args, **kwargs)
            if method == "POST" and path in upload_paths:
                self.max_content_length = limit  # read by the multipart parser

    return UploadRequest


async def read_upload(param: str = "file") -> tuple[bytes, str, dict[str, str]]:
    """(content, file name, other form fields) of a multipart upload (`param` = the file part) or of a raw
    body (name from `?name=`). Raises CyError(INVALID_REQUEST); 413 past the route's limit."""
    if request.mimetype == "multipart/form-data":
        files = await request.files
        form = await request.form
        upload = files.get(param)
        if upload is None:
            raise invalid(param, f"the multipart body has no file part named '{param}'", type_="missing_field")
        return upload.read(), upload.filename or "", {k: str(v) for k, v in form.items()}
    if request.mimetype not in RAW_TYPES:
        raise invalid(
            "Content-Type",
            f"'{request.mimetype}' is not accepted: send multipart/form-data with a '{param}' part, "
            "or the file itself as application/jsonl or application/json",
            type_="unsupported_media_type",
        )
    data: bytes = await request.get_data(as_text=False)  # type: ignore[assignment]
    return data, request.args.get("name", ""), {}


def dataset_view(info: DatasetInfo) -> dict[str, Any]:
    return {
        "id": info.dataset_id,
        "object": "dataset",
        "name": info.name,
        "format": info.format,
        "rows": info.rows,
        "bytes": info.bytes,
        "digest": info.digest,
        "createdAt": iso(info.created_ms),
    }


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("datasets", __name__)

    @bp.post("/datasets")
    async def upload() -> Response:
        data, name, _ = await read_upload()
        info = await core.datasets.put(data, name)
        return json_response(dataset_view(info), status=201)

    @bp.get("/datasets")
    async def list_datasets() -> Response:
        found = await core.datasets.list()
        return json_response({"datasets": [dataset_view(d) for d in found], "total": len(found)})

    @bp.get("/datasets/<dataset_id>")
    async def get_dataset(dataset_id: str) -> Response:
        return json_response(dataset_view(await core.datasets.info(dataset_id)))

    @bp.delete("/datasets/<dataset_id>")
    async def delete_dataset(dataset_id: str) -> Response:
        info = await core.datasets.delete(dataset_id)
        return json_response({"id": info.dataset_id, "object": "dataset", "deleted": True})

    return bp
