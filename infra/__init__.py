"""Launchers, nats-server configuration, the model registry file and model preparation."""
