"""Bit-identity of training across a refactor: three tiny private jobs (DP-Cap, DP-Cap
stopped at step 3 and resumed, ViP) run from the checkout REPO, with a fixed secret seed;
prints a hash of each final checkpoint's parameters (DCP converted by torch's own
dcp_to_torch_save, read without the project's code) and the last logged losses.
Run it from two checkouts and compare the JSON:

    python benchmarks/bit_identity.py OLD_CHECKOUT /tmp/before > before.json
    python benchmarks/bit_identity.py . /tmp/after > after.json
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

repo, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
COMMON = ["data.num_examples=2000", "ds.train_batch_size=64", "ds.train_micro_batch_size_per_gpu=32",
          "privacy.secret_seed=123", "metrics.log_every=1", "metrics.progress=false", "eval.zero_shot=false",
          "data.heldout_examples=20", "optim.warmup_steps=2", "privacy.noise_multiplier=1.0", "privacy.target_epsilon=null"]
jobs = {
    "dpcap": (["--config", "default", "steps=6", "checkpoint.every_steps=3"], []),
    "dpcap_resumed": (["--config", "default", "steps=3", "checkpoint.every_steps=3"], ["steps=6"]),
    "vip": (["--config", "default", "model.name=vip_base", "steps=4",
             "checkpoint.every_steps=4"], []),
}
result = {}
for name, (args, again) in jobs.items():
    folder = out / name
    cmd = [sys.executable, "-m", "trainer.train", *args, *COMMON, f"name={name}",
           f"checkpoint.dir={folder}/ckpt", f"metrics.log_dir={folder}/tb", f"data.shards={folder}/shards"]
    for extra in ([], again) if again else ([],):
        p = subprocess.run(cmd + extra, cwd=out, env=env, capture_output=True, text=True)
        if p.returncode:
            print(name, p.stderr[-3000:]); sys.exit(1)
    last = sorted((folder / "ckpt").glob("step_*"))[-1]
    dcp_to_torch_save(last, folder / "w.pt")
    sd = torch.load(folder / "w.pt", weights_only=True)
    model = {k: v for k, v in sd["app"]["model"].items()} if "app" in sd else sd
    h = hashlib.sha256()
    for k in sorted(model):
        h.update(k.encode()); h.update(model[k].float().numpy().tobytes())
    ea = EventAccumulator(str(folder / "tb")); ea.Reload()
    losses = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    result[name] = {"step": last.name, "params_sha256": h.hexdigest()[:16], "losses": losses[-3:]}
print(json.dumps(result, indent=1))
