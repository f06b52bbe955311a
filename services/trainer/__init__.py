"""The LoRA trainer service: jobs from a JetStream work queue, peft training, adapters registered in KV."""
