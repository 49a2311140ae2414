"""The trainer: composes models, privacy and data into a training job, and tools that
use a trained model.

- ``trainer/train.py``: the entry point of the training job (``python -m trainer.train``);
- ``trainer/job/``: the job's components (the Trainer loop, the backend seam and its
  fsdp2 and deepspeed implementations with their privacy reducers, checkpointing,
  metrics, optimizer and schedule, privacy plan, readers, distributed start);
- ``trainer/common/``: what the job and the tools both need (config and presets, model
  and tokenizer builders, model inputs, checkpoint reading, held-out images,
  evaluation, linear probes), importing neither;
- ``trainer/probe.py``, ``caption.py``, ``export.py``: tools (``python -m trainer.probe``, ...).

Arrows point one way: the entry point imports the job, the job and the tools import
``common``, never each other (tests/test_imports.py checks it).
"""
