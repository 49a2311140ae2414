"""Measuring tools: run from the repository root, never installed.

The installed packages (``privacy``, ``models``, ``data``, ``trainer``) never import
this one (tests/test_imports.py checks it); what these tools need beyond the product's
dependencies is setup.cfg's ``bench`` extra (Opacus, timm, torchvision, transformers).

- ``step_counters``: model-free counters of one training step (FLOPs, aten operators,
  bytes written outside matmuls, host syncs, peak live bytes) and round-robin timing;
- ``suite`` (``python -m benchmarks.suite``): private steps against the non-private one
  on the same model, batch and precision (this engine, its two-pass mode, Opacus);
- ``gpu_check`` (``./launch.sh gpu-check --out DIR``): the first-GPU check;
- ``data_reader`` (``python -m benchmarks.data_reader``): decoded images per second per core;
- ``data_index`` (``python -m benchmarks.data_index``): loader workers' memory over a
  paper-scale index.
"""
