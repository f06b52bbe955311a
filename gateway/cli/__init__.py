"""`cy`: the command-line client of the gateway (chat, completions, models, health, LoRA training jobs).

It speaks only HTTP: /api/v1 (X-API-Key) and, for `cy chat`, the OpenAI-compatible /v1.
"""
