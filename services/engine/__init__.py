"""Engine workers: pull generate requests from JetStream and stream tokens back over NATS."""
