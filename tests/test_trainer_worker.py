"""Support for the trainer tests: a tiny stand-in model and data, and a worker
script run by real launchers (torchrun, the deepspeed launcher) in subprocesses.

    python tests/test_trainer_worker.py CONFIG.json OUT.pt [key=value ...]

trains a Trainer on the stand-in (or, with model.name=dpcap_*, the real model
from models/) and writes the full parameters and the epsilon to OUT.pt on rank 0;
``--then CONFIG.json OUT2.pt [key=value ...]`` runs further jobs in the same
processes (a launch costs more than a tiny job).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB, WIDTH, TEXT = 11, 10, 4
SIGMA = 20.0  # a noise multiplier this large swamps the clipped sum: the gradient is noise within 6% (norm)


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, 7)  # 7 rows: uneven shards on 2 and 3 ranks
        self.fc2 = nn.Linear(7, WIDTH)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyCaptioner(nn.Module):
    """model(images, tokens) -> per-example loss [B], like DP-Cap, in 5 layer kinds."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, WIDTH)
        self.blocks = nn.ModuleList([TinyBlock(), TinyBlock()])
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, images, tokens):
        x = self.embed(images.flatten(1))
        for block in self.blocks:
            x = block(x)
        logits = self.head(x.unsqueeze(1) + self.tok(tokens))  # [B, T, V]
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)


def tiny_data(n: int = 96, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 2, 2, generator=g)
    labels = (images.mean((1, 2, 3)) > 0).long()
    tokens = torch.stack([torch.tensor([1, 2 + int(y), 5 + int(y), 9]) for y in labels])
    return [(images[i], tokens[i]) for i in range(n)]


def tiny_config(tmp: Path, **overrides) -> dict:
    """A JSON-able config for the stand-in; overrides use dotted keys."""
    cfg = {
        "name": "tiny", "ds_config": "default.json", "steps": 6, "seed": 3,
        "ds": {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": False}},
        "model": {"name": "dpcap_tiny_standin", "overrides": {"img_size": 2}},
        "data": {"num_examples": 96, "text_length": TEXT},
        # a fixed secret seed: runs compared with each other must draw the same batches
        "privacy": {"noise_multiplier": 0.0, "max_grad_norm": 0.5, "delta": 1e-3, "secret_seed": 5},
        "optim": {"lr": 0.05, "warmup_steps": 2},
        "checkpoint": {"dir": str(tmp / "ckpt"), "every_steps": 0, "keep_last": 2},
        "metrics": {"log_dir": str(tmp / "tb"), "log_every": 1, "pld_every": 3, "progress": False},
        "eval": {"zero_shot": False},
    }
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


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
    main(sys.argv[1:])


# ---------------------------------------------------------------- test-side helpers

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def rank_draws(grads: dict[str, torch.Tensor], world: int, flat_partitions: bool = False) -> list[torch.Tensor]:
    """Each rank's part of the leading parameters of one step's whole gradients, up to the
    first that does not split evenly: dim-0 chunks of ceil(rows / world) rows (FSDP2, ZeRO 0-2)
    or of the flattened parameter (ZeRO-3). The engine draws a rank's noise parameter after
    parameter from one generator; two ranks sharing a stream would draw these parts alike,
    but only while their parts have equal shapes: torch.randn of 40 and of 30 elements from
    one seed differ everywhere (checked), so after the first uneven part nothing lines up."""
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for g in grads.values():
        g = g.flatten() if flat_partitions else g
        if g.shape[0] % world:
            break
        n = g.shape[0] // world
        for rank, part in enumerate(parts):
            part.append(g[rank * n: (rank + 1) * n].flatten())
    return [torch.cat(part) for part in parts]


def assert_noised_once_per_coordinate(steps: list[dict[str, torch.Tensor]], sigma: float, clip: float, batch: int,
                                      world: int, flat_partitions: bool = False) -> None:
    """The captured gradients of ``steps`` (noise swamping the clipped sum) are N(0, (sigma C / B)^2)
    per coordinate, and rank 0's draws are uncorrelated with rank 1's (rank_draws)."""
    expected = sigma * clip / batch
    grads = torch.cat([flat(g) for g in steps])
    assert grads.numel() > 1000, grads.numel()
    # 4000 coordinates: standard error of the std 1.1%; noised twice would be +41%, once per rank
    # and averaged over 2 ranks -29%, not at all -100%
    assert abs(grads.std().item() / expected - 1) < 0.06, grads.std().item() / expected
    assert abs(grads.mean().item()) < 4 * expected / grads.numel() ** 0.5
    draws = [rank_draws(step, world, flat_partitions) for step in steps]
    pairs = torch.stack([torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])])
    corr = torch.corrcoef(pairs)[0, 1].item()
    # 450 pairs or more: standard error 0.05 or less; ranks sharing one stream give about 1
    assert pairs.shape[1] >= 450 and abs(corr) < 0.25, (pairs.shape, corr)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(world: int, config: Path, out: Path, overrides=(), launcher: str = "torchrun") -> list[str]:
    script = [str(REPO / "tests" / "test_trainer_worker.py"), str(config), str(out), *overrides]
    if world == 1 and launcher == "python":
        return [PY, *script]
    if launcher == "deepspeed":
        return [str(Path(PY).parent / "deepspeed"), "--no_ssh", "--node_rank", "0",
                "--num_gpus", str(world), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), *script]
    return [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
            "--master-port", str(free_port()), *script]


def run_worker(world: int, tmp: Path, cfg: dict, overrides=(), launcher: str = "torchrun",
               name: str = "out") -> dict:
    """Run the worker to completion; returns what rank 0 saved."""
    return run_jobs(world, tmp, [(name, cfg, list(overrides))], launcher)[name]


def run_jobs(world: int, tmp: Path, jobs: list[tuple[str, dict, list[str]]], launcher: str = "torchrun") -> dict:
    """Several jobs ``(name, config, overrides)`` one after the other in one launch;
    returns name -> what rank 0 saved."""
    import subprocess

    args = []
    for name, cfg, overrides in jobs:
        (tmp / f"{name}.json").write_text(json.dumps(cfg))
        args += [THEN] * bool(args) + [str(tmp / f"{name}.json"), str(tmp / f"{name}.pt"), *overrides]
    proc = subprocess.run(worker_command(world, Path(args[0]), Path(args[1]), args[2:], launcher), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {name: torch.load(tmp / f"{name}.pt", weights_only=True) for name, _, _ in jobs}


TINY_MODEL = ["model.overrides.img_size=32", "model.overrides.patch_size=8", "model.overrides.embed_dim=32",
              "model.overrides.depth=1", "model.overrides.num_heads=2", "model.overrides.decoder_embed_dim=32",
              "model.overrides.decoder_depth=1", "model.overrides.decoder_num_heads=2"]


def save_like_trainer(folder: Path, cfg, model: nn.Module, optimizer=None, step: int = 3, engine=None,
                      sampling_seed: int = 0) -> Path:
    """A checkpoint as backend=fsdp2 writes it (DCP tensors, then meta.json with the config
    and the train state), from one process; returns its step folder."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from trainer.common.checkpoints import ModelOptimizerState
    from trainer.job.checkpoint import Checkpointer

    class Tensors:  # the one method of a backend that Checkpointer.save calls
        def save(self, tmp: Path) -> None:
            dcp.save({"app": ModelOptimizerState(model, optimizer)}, checkpoint_id=str(tmp))

    with warnings.catch_warnings():  # DCP's note that it saves in one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        from trainer.common.checkpoints import META_FORMAT

        train_state = {"step": step, "sampling_seed": sampling_seed, "lineage": None, "backend": "fsdp2",
                       "world_size": 1}
        return Checkpointer(folder, 1, 0).save(step, Tensors(), {"format": META_FORMAT, "config": cfg.to_dict(),
                                                                 "train_state": train_state, "engine": engine})
