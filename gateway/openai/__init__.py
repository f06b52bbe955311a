"""The OpenAI-compatible Lite API (/v1, port 8000): a drop-in target for the official OpenAI SDKs."""
