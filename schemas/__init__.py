"""The wire: every event that crosses NATS, the subject names, the codec and the error codes."""
