"""The training job's components, driven by trainer.job.trainer.Trainer (see trainer/__init__.py)."""
