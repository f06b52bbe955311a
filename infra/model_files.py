"""Moved to services/models/files.py (`python -m services.models` prepares the models). Kept only for
importers that are being edited elsewhere right now (infra/up.py, infra/bench/); delete once they import
services.models.files."""

from services.models.files import ensure_model, ensure_openvino

__all__ = ["ensure_model", "ensure_openvino"]
