"""NATS services: engine workers and the LoRA trainer."""
