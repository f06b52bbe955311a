"""Training as the gateway and the trainers both see it: the job records in the jobs KV bucket and the work queue
(records.py), the API verbs over them (jobs.py, `JobService`), the datasets (validation in datasets.py, the
object store in dataset_store.py) and the roots that user paths are confined to (paths.py). The trainer service
itself (peft training, its worker loop) is services/trainer/."""
