"""Moved: the /api/v1 error envelope to gateway/api_v1/errors.py, the JSON helpers both faces share to
gateway/http_json.py. Kept only for gateway/openai/errors.py and gateway/openai/completions.py, which are being
edited elsewhere right now; delete once they import gateway.http_json."""

from gateway.http_json import json_response, unreadable_json

__all__ = ["json_response", "unreadable_json"]
