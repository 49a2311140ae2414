"""The worker script that real launchers (torchrun, the deepspeed launcher, ranks started by
hand as srun starts them) run in the trainer tests:

    python tests/helpers/worker.py CONFIG.json OUT.pt [key=value ...]

trains a Trainer on the stand-in (tests.helpers.standin; or, with model.name=dpcap_*, the
real model from models/) and writes the full parameters and the epsilon to OUT.pt on rank 0;
``--then CONFIG.json OUT2.pt [key=value ...]`` runs further jobs in the same
processes (a launch costs more than a tiny job). tests.helpers.jobs starts it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

FLAGS = ("pause_at=", "capture=", "kill_at=")  # the worker's own arguments; the others override the config
THEN = "--then"  # separates the jobs of one launch: python startup, not training, is most of a test's time


def gate_files(out: Path, rank: int) -> tuple[Path, Path]:
    """The file a rank writes (its pid) when it reaches the gate, and the one that opens it."""
    return out.with_name(f"{out.name}.paused{rank}"), out.with_name(f"{out.name}.go")


def wait_at_gate(out: Path, rank: int, timeout: float = 600) -> None:
    """Say this rank's pid, then wait until the test opens the gate (or kills this process)."""
    paused, go = gate_files(out, rank)
    partial = paused.with_name(paused.name + ".tmp")
    partial.write_text(str(os.getpid()))
    partial.rename(paused)  # whole, or not at all
    deadline = time.monotonic() + timeout
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} never appeared")
        time.sleep(0.05)


def main(argv: list[str]) -> None:
    from trainer.job.distributed import exit_process, shutdown

    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher's
    while THEN in argv:
        cut = argv.index(THEN)
        run_job(argv[:cut])
        argv = argv[cut + 1:]
    run_job(argv)
    shutdown()
    exit_process(0)


def run_job(argv: list[str]) -> None:
    """One Trainer: CONFIG.json OUT.pt [pause_at=STEP] [capture=grads] [key=value ...]."""
    from tests.helpers.standin import TinyCaptioner, tiny_data
    from trainer.common.config import load_config
    from trainer.job.trainer import Trainer

    config_path, out = argv[0], Path(argv[1])
    flags = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv[2:] if a.startswith(FLAGS)}
    overrides = [a for a in argv[2:] if not a.startswith(FLAGS)]
    cfg = load_config(config_path, overrides)
    standin = cfg.model.name == "dpcap_tiny_standin"
    # kill_at=PHASE:STEP: this process SIGKILLs itself there (as a node failure would): "index"
    # after scanning the shards, before their index is merged; "step" during step STEP, after
    # its first micro-batch's backward; "save" in the save at step STEP, once the backend's
    # tensors are in the unfinished folder and before meta.json and the rename
    phase, _, kill_step = flags.get("kill_at", "::").partition(":")
    if phase == "index":
        import data.shard_sets

        data.shard_sets.merge_parts = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    trainer = Trainer(cfg, allow_non_private=True,
                      model_factory=(lambda c, t: TinyCaptioner()) if standin else None,
                      train_data=tiny_data(cfg.data.num_examples) if standin else None)
    if "pause_at" in flags:  # so a test can kill or signal the run at a known step
        step = trainer.train_step

        def gated(*args):
            if trainer.step == int(flags["pause_at"]):
                wait_at_gate(out, trainer.dist.rank)
            return step(*args)

        trainer.train_step = gated
    if phase in ("step", "save"):
        owner, name = (trainer.engine, "backward") if phase == "step" else (trainer.backend, "save")
        original = getattr(owner, name)

        def killing(*args, **kwargs):
            result = original(*args, **kwargs)
            if trainer.step == int(kill_step) - (phase == "step"):
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, name, killing)
    captured = []
    if flags.get("capture") == "grads":  # the whole gradient the optimizer steps from, at every step
        apply = trainer.backend.step

        def whole(p: nn.Parameter) -> torch.Tensor:
            if cfg.backend == "deepspeed":
                from deepspeed.utils import safe_get_full_grad  # collective under ZeRO

                return safe_get_full_grad(p)
            return p.grad.full_tensor()  # FSDP2: a sharded DTensor

        def capturing(lr):
            captured.append({name: whole(p).float().cpu().clone() for name, p in trainer.model.named_parameters()})
            apply(lr)

        trainer.backend.step = capturing
    summary = trainer.train()
    params = trainer.backend.full_state_dict()
    copies = []
    if cfg.backend == "deepspeed":  # every rank's own copy of the parameters, on rank 0
        mine = torch.cat([p.detach().float().flatten() for p in trainer.model.parameters()])
        copies = [torch.zeros_like(mine) for _ in range(trainer.dist.world_size)]
        torch.distributed.all_gather(copies, mine)
    if trainer.dist.rank == 0:
        torch.save({"params": params, "summary": summary, "resumed_from": trainer.resumed_from,
                    "bytes_per_step": trainer.backend.reducer.bytes_sent, "grads": captured,
                    "rank_copies": copies, "param_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()})},
                   out)
        print(json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float, str))}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the repository first
    main(sys.argv[1:])
