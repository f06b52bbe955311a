"""OpenAI's /v1/files for fine-tuning data, on the same object store as /api/v1/datasets (one id for both).

Only `purpose="fine-tune"` is accepted; a file is validated row by row when it is uploaded (chat `messages`
rows as OpenAI documents them, or Alpaca rows), so a file that is listed is always usable for training. A file
that a queued, running or paused job trains from is not deleted (409, `code` `resource_in_use`).
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, request

from gateway.core import GatewayCore
from gateway.http_json import json_response
from gateway.openai.errors import bad_request
from gateway.uploads import read_upload
from services.training import holders
from services.training.dataset_store import DatasetInfo

PURPOSE = "fine-tune"


def file_object(info: DatasetInfo) -> dict[str, Any]:
    return {
        "id": info.dataset_id,
        "object": "file",
        "bytes": info.bytes,
        "created_at": info.created_ms // 1000,
        "filename": info.name,
        "purpose": PURPOSE,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def _limit() -> int:
    raw = request.args.get("limit", "")
    if not raw:
        return 10_000
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 10_000:
        raise bad_request("limit", f"Invalid value for 'limit': '{raw}' is not an integer between 1 and 10000.")
    return int(raw)


def make_blueprint(core: GatewayCore) -> Blueprint:
    bp = Blueprint("openai_files", __name__)

    @bp.post("/files")
    async def create_file() -> Response:
        data, name, form = await read_upload("file")
        purpose = form.get("purpose", "")
        if purpose != PURPOSE:
            raise bad_request(
                "purpose",
                f"Invalid value for 'purpose': '{purpose}'. Only '{PURPOSE}' files are supported here.",
                code="invalid_value" if purpose else "missing_required_parameter",
            )
        return json_response(file_object(await core.datasets.put(data, name)))

    @bp.get("/files")
    async def list_files() -> Response:
        purpose = request.args.get("purpose", "")
        found = [] if purpose and purpose != PURPOSE else await core.datasets.list()
        if request.args.get("order", "desc") == "asc":
            found.reverse()
        after = request.args.get("after", "")
        if after:
            ids = [d.dataset_id for d in found]
            found = found[ids.index(after) + 1 :] if after in ids else []
        limit = _limit()
        page = found[:limit]
        return json_response(
            {
                "object": "list",
                "data": [file_object(d) for d in page],
                "has_more": len(found) > limit,
                "first_id": page[0].dataset_id if page else None,
                "last_id": page[-1].dataset_id if page else None,
            }
        )

    @bp.get("/files/<file_id>")
    async def retrieve_file(file_id: str) -> Response:
        return json_response(file_object(await core.datasets.info(file_id, field="file_id")))

    @bp.delete("/files/<file_id>")
    async def delete_file(file_id: str) -> Response:
        info = await holders.delete_dataset(core.training.records, core.datasets, file_id, "file_id")
        return json_response({"id": info.dataset_id, "object": "file", "deleted": True})

    @bp.get("/files/<file_id>/content")
    async def file_content(file_id: str) -> Response:
        info, data = await core.datasets.read(file_id, field="file_id")
        content_type = "application/json" if info.format == "json" else "application/jsonl"
        return Response(data, content_type=content_type)

    return bp
