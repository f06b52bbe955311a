"""Moved to services/models/registry.py. Kept only for importers that are being edited elsewhere right now
(infra/up.py, infra/bench/, tests/dispatch/, tests/gateway/test_openai_*.py); delete once they import
services.models.registry."""

from services.models.registry import ModelSource, ModelSpec, Registry, load_registry

__all__ = ["ModelSource", "ModelSpec", "Registry", "load_registry"]
