"""Models: the registry file (`modelId` -> how to load and serve it) and the preparation of each model's files
on disk (GGUF -> safetensors conversion, OpenVINO export). Used by the engine workers, the trainer and the
gateway; `python -m services.models` prepares them ahead of time."""
