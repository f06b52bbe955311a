"""/api/v1/datasets: upload (validated row by row), list, get, delete training datasets kept in the JetStream
object store, so that `POST /training/start {"datasetId": ...}` needs no disk shared with the trainers. A dataset
that a queued, running or paused job trains from is not deleted (409 RESOURCE_IN_USE: services/training/holders.py).

Uploads are read by gateway/uploads.py, which also gives them their own size limit.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from gateway.api_v1.training import iso
from gateway.core import GatewayCore
from gateway.http_json import json_response
from gateway.uploads import read_upload
from services.training import holders
from services.training.dataset_store import DatasetInfo


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
        info = await holders.delete_dataset(core.training.records, core.datasets, dataset_id, "id")
        return json_response({"id": info.dataset_id, "object": "dataset", "deleted": True})

    return bp
