"""The HTTP edge: /api/v1 (port 8080) and the OpenAI-compatible Lite API /v1 (port 8000)."""
