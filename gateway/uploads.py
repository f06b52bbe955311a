"""File uploads for both apps (/api/v1/datasets, /v1/files): a multipart part or a raw body, under a size limit
of their own (`CY_LLM_MAX_DATASET_BYTES`) where every other body has the app's smaller one."""

from __future__ import annotations

from typing import Any

from quart import Request, request

from schemas.errors import invalid

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
