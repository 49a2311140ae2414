"""FSDP2 + privacy engine across real gloo ranks: equivalence, noise, bytes per step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tests.helpers.jobs import WORKER, run_jobs, run_worker
from tests.helpers.noise import SIGMA, assert_noised_once_per_coordinate
from tests.helpers.processes import PY, REPO, free_port
from tests.helpers.standin import TinyCaptioner, tiny_config, tiny_data
from tests.helpers.worker import THEN


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one")
    return run_worker(1, tmp, tiny_config(tmp), launcher="python")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The trainer on 2 ranks (the deepspeed launcher, backend fsdp2) in one launch: noise
    off, then noise on with the gradient of every step kept."""
    tmp = tmp_path_factory.mktemp("two")
    return run_jobs(2, tmp, [("exact", tiny_config(tmp / "exact"), []),
                             ("noise", tiny_config(tmp / "noise"),
                              ["capture=grads", f"privacy.noise_multiplier={SIGMA}"])], launcher="deepspeed")


@pytest.mark.parametrize("world, launcher", [(2, "deepspeed"), (3, "torchrun")])
def test_ranks_reach_the_same_parameters_as_one_rank(tmp_path, request, one_rank, world, launcher):
    """Noise off: 2 and 3 ranks (uneven shards: 7-row layers) == 1 rank on the same data."""
    if world == 2:
        out = request.getfixturevalue("two_ranks")["exact"]
    else:
        out = run_worker(world, tmp_path, tiny_config(tmp_path), launcher=launcher)
    torch.manual_seed(3)
    init = TinyCaptioner().state_dict()
    moved = max((one_rank["params"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-2, "training did not change the parameters; the comparison would be empty"
    for key, ref in one_rank["params"].items():
        torch.testing.assert_close(out["params"][key], ref, rtol=1e-5, atol=1e-6, msg=key)
    # every step moves every clipped gradient once: the padded fp32 size of all parameters
    n_params = sum(-(-p.shape[0] // world) * world * p[0].numel() for p in init.values())
    assert out["bytes_per_step"] == 4 * n_params


def test_the_trainer_noises_each_rank_shard_from_the_rank_own_stream(two_ranks):
    """backend=fsdp2 as the trainer wires it (the reducer's noise_stream is the rank): every
    coordinate of the gradient stepped from carries N(0, (sigma C / B)^2) once, and rank 1's
    shard is not a copy of rank 0's draws."""
    assert_noised_once_per_coordinate(two_ranks["noise"]["grads"], SIGMA, clip=0.5, batch=32, world=2)


def test_two_simulated_nodes_reach_the_same_parameters_as_one_rank(tmp_path, one_rank):
    """The deepspeed launcher on 2 "nodes" of 2 ranks each (--no_ssh --node_rank, as on a
    cluster without ssh), backend fsdp2 then backend deepspeed at ZeRO-3 (every parameter
    partitioned) in the same processes: global ranks, not local ones, decide shards,
    partitions and noise streams."""
    import json
    import subprocess

    (tmp_path / "hostfile").write_text("node-a slots=2\nnode-b slots=2\n")
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(tiny_config(tmp_path / "fsdp2")))
    (tmp_path / "zero3.json").write_text(json.dumps(tiny_config(tmp_path / "zero3")))
    port = str(free_port())
    jobs = [str(config), str(tmp_path / "fsdp2.pt"), THEN, str(tmp_path / "zero3.json"), str(tmp_path / "zero3.pt"),
            "backend=deepspeed", "ds.zero_optimization.stage=3", "ds.zero_optimization.stage3_param_persistence_threshold=0"]
    nodes = [subprocess.Popen([str(Path(PY).parent / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"),
                               "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1",
                               "--master_port", port, str(WORKER), *jobs],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    torch.manual_seed(3)
    shapes = [p.shape for p in TinyCaptioner().state_dict().values()]
    for backend in ("fsdp2", "zero3"):
        out = torch.load(tmp_path / f"{backend}.pt", weights_only=True)
        for key, ref in one_rank["params"].items():
            torch.testing.assert_close(out["params"][key], ref, rtol=1e-5, atol=1e-6, msg=f"{backend} {key}")
    fsdp2 = torch.load(tmp_path / "fsdp2.pt", weights_only=True)
    assert fsdp2["bytes_per_step"] == 4 * sum(-(-s[0] // 4) * 4 * torch.Size(s[1:]).numel() for s in shapes)


def _noise_worker(rank: int, world: int, port: int, sigma: float, clip: float, batch: int, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from privacy import PrivacyEngine
    from trainer.job.distributed import init_distributed
    from trainer.job.fsdp2_backend import FSDPGradReducer, parallelize

    d = init_distributed()
    # the last layer has one row: rank 1 holds an empty shard of it
    model = nn.Sequential(nn.ModuleList([nn.Linear(101, 300)]), nn.Linear(300, 99), nn.Linear(99, 1))
    parallelize(model, d.mesh, bf16=False)
    reducer = FSDPGradReducer(d.mesh, noise_stream=rank)
    engine = PrivacyEngine(model, max_grad_norm=clip, noise_multiplier=sigma,
                           expected_batch_size=batch, seed=1234, reducer=reducer)
    engine.finish_step()  # an empty logical step: the gradient is pure noise
    full = _full_grads(model)
    try:  # a replicated parameter would be noised once per rank
        reducer.reduce(nn.Parameter(torch.zeros(3)), torch.zeros(3))
        refusal = None
    except ValueError as e:
        refusal = str(e)
    if rank == 0:
        q.put(({k: v.numpy() for k, v in full.items()}, refusal))  # by value
    _leave(q)


def _leave(q) -> None:
    """End a spawned rank as the trainer does: flush the result queue, shut down, and skip
    interpreter teardown (where a gloo rank sometimes aborts; trainer.job.distributed.exit_process)."""
    from trainer.job.distributed import exit_process, shutdown

    q.close()
    q.join_thread()
    shutdown()
    exit_process(0)


def _full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: every parameter's whole gradient (the grads become the params, to gather them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    for p in model.parameters():
        p.data.copy_(p.grad)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def test_noise_std_is_sigma_c_over_b_once_per_coordinate():
    sigma, clip, batch = 0.8, 2.0, 40
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ctx_proc = mp.start_processes(_noise_worker, args=(2, free_port(), sigma, clip, batch, q),
                                  nprocs=2, join=False, start_method="spawn")
    full, refusal = q.get(timeout=120)
    ctx_proc.join()
    grads = {k: torch.from_numpy(v) for k, v in full.items()}
    assert_noised_once_per_coordinate([grads], sigma, clip, batch, world=2)
    # the one-row layer (on rank 0 alone) is noised too: 100 coordinates, standard error 7%
    one_row = torch.cat([grads["2.weight"].flatten(), grads["2.bias"]])
    assert one_row.numel() == 100 and abs(one_row.std().item() / (sigma * clip / batch) - 1) < 0.3
    assert refusal is not None and "not FSDP-sharded" in refusal and "parallelize" in refusal


def test_ranks_without_examples_pad_with_empty_micro_batches(tmp_path):
    """B = 2 on 3 ranks: most steps leave a rank (or every rank) without examples; the
    empty ones still run the FSDP collectives, and the result matches 1 rank."""
    settings = {"ds.train_batch_size": 2, "steps": 8, "optim.lr": 0.2}
    one = run_worker(1, tmp_path, tiny_config(tmp_path / "a", **settings), launcher="python", name="a")
    three = run_worker(3, tmp_path, tiny_config(tmp_path / "b", **settings), name="b")
    # The 3-rank clipped sums add the same terms in another order (fp32 rounding), and AdamW at
    # lr 0.2 magnifies that on coordinates whose gradient is near 0 (its first update is
    # lr g / (|g| + eps)). Largest difference measured over 13 samplers (privacy.secret_seed
    # 1-12, 17): 4e-7 to 4.9e-6, and 1.2e-5 at seed 11; one example dropped from rank 1's last
    # step moves a parameter by 6.5e-3.
    for key, ref in one["params"].items():
        torch.testing.assert_close(three["params"][key], ref, rtol=1e-5, atol=5e-5, msg=key)


def _clipped_sum(model: nn.Module, batch, reducer=None) -> tuple[nn.Module, dict[str, float]]:
    from privacy import PrivacyEngine

    engine = PrivacyEngine(model, max_grad_norm=0.05, noise_multiplier=0.0,
                           expected_batch_size=16, seed=1, reducer=reducer)
    images, tokens = batch
    engine.backward(model(images, tokens))
    return model, engine.finish_step()


def _bf16_worker(rank: int, world: int, port: int, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from trainer.job.distributed import init_distributed
    from trainer.job.fsdp2_backend import FSDPGradReducer, parallelize

    d = init_distributed()
    torch.manual_seed(3)
    model = parallelize(TinyCaptioner(), d.mesh, bf16=True)
    images, tokens = map(torch.stack, zip(*tiny_data(16)[rank::world]))
    seen = []
    model.blocks[0].fc1.register_forward_hook(lambda m, i, o: seen.append((o.dtype, m.weight.dtype)))
    _, stats = _clipped_sum(model, (images, tokens), FSDPGradReducer(d.mesh, noise_stream=rank))
    kinds = {(type(p).__name__, p.dtype, p.grad.dtype, type(p.grad).__name__) for p in model.parameters()}
    full = _full_grads(model)
    if rank == 0:
        q.put(({k: v.numpy() for k, v in full.items()}, sorted(map(str, kinds)), str(seen[0]), stats))
    _leave(q)


def test_bf16_fsdp_clipped_gradient_matches_fp32_single_process():
    """bf16 parameters (FSDP2 mixed precision) on 2 ranks: fp32 sharded gradients equal
    to the fp32 single-process clipped sum within bf16 rounding; the update direction
    is the same, not merely finite."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = mp.start_processes(_bf16_worker, args=(2, free_port(), q), nprocs=2, join=False,
                               start_method="spawn")
    grads, kinds, seen, stats = q.get(timeout=120)
    procs.join()
    assert seen == str((torch.bfloat16, torch.bfloat16)), "the layers did not compute in bf16"
    assert kinds == [str(("DTensor", torch.float32, torch.float32, "DTensor"))]
    torch.manual_seed(3)
    model, ref_stats = _clipped_sum(TinyCaptioner(), tuple(map(torch.stack, zip(*tiny_data(16)))))
    assert ref_stats["clip_fraction"] > 0.5  # clipping is active, so the norms matter
    assert stats["examples"] == 8  # rank 0's half
    flat_ref = torch.cat([p.grad.flatten() for p in model.parameters()])
    flat = torch.cat([torch.from_numpy(grads[name]).flatten() for name, _ in model.named_parameters()])
    error = (flat - flat_ref).norm() / flat_ref.norm()
    assert error < 1e-2, error  # measured 0.004 (bf16 activations); clip factors 5% too big give 0.04
