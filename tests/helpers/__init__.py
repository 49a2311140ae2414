"""What several test modules share, by job; no tests here (tests/test_suite_layout.py checks).

Test modules import these as ``tests.helpers.NAME`` and never import one another, so
that each test module can be read, run and renamed alone:

- processes: the repository root, free ports, waiting for a process under a deadline,
  killing a whole job
- standin: the tiny stand-in captioner, its data and config, the tiny real-model overrides
- worker: the script that launchers (torchrun, the deepspeed launcher, Slurm-like ranks) run
- jobs: starting that worker and reading what it saved
- noise: checks that a run's gradients carry its noise once per coordinate
- checkpoints: a checkpoint as the trainer writes it, from one process
- payloads: pickles that would run code when loaded, for the refusals of untrusted files
- cli: the command-line tools in a fresh process; the tiny default job
- samples: random images, a byte tokenizer and the captions read back, for the data tests
- tars: tar headers crafted byte by byte
- shards: shards as other tools (img2dataset) write them
- photos: small real-looking pictures of coloured shapes, a class folder of them
- privacy: small models of every supported layer, classifiers' losses and batches,
  torch.func references
- broken_engines: privacy engines broken on purpose, for the audit
"""
