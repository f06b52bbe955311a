"""Moved to tests/nats_client.py. Kept only for tests/engine/contract.py and tests/engine/test_openvino_contract.py,
which others are editing now: delete this folder once they import tests.nats_client."""

from tests.nats_client import Collected, connect, request, submit

__all__ = ["Collected", "connect", "request", "submit"]
