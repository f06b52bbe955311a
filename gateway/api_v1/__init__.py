"""The spec's full REST API under /api/v1 (port 8080, X-API-Key)."""
