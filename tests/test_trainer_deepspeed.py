"""backend=deepspeed through the real deepspeed launcher on gloo: ZeRO 0-3 on 2 ranks equal
FSDP2 on one rank, noise once per coordinate at every stage, bf16, SIGKILL then resume,
and the configs DeepSpeed must accept. (Two simulated nodes: test_trainer_distributed;
the real job, its evaluation and export under ZeRO-3: test_trainer_job.)"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from tests.helpers.jobs import paused_pids, run_jobs, run_worker, start_worker
from tests.helpers.noise import SIGMA, assert_noised_once_per_coordinate, flat
from tests.helpers.processes import REPO, kill_job
from tests.helpers.standin import NOISY_CHECKPOINTED, TinyCaptioner, tiny_config
from trainer.common.config import PRESETS, load_config
from trainer.job.deepspeed_backend import cpu_allreduce_buffer
from trainer.job.validation import validate

DEEPSPEED = ["backend=deepspeed"]
# DeepSpeed keeps parameters under 1e5 elements whole by default: partition all of them
ZERO3 = ["ds.zero_optimization.stage=3", "ds.zero_optimization.stage3_param_persistence_threshold=0"]
# ZeRO-1 with the config's optimizer section (DeepSpeed builds torch's AdamW from it, with
# the job's lr, betas and parameter groups), the others with the trainer's AdamW
STAGES = {0: [], 1: ["ds.zero_optimization.stage=1", "ds.optimizer={type: AdamW, params: {torch_adam: true}}"],
          2: ["ds.zero_optimization.stage=2"], 3: ZERO3}


def _stage_config(stage: int) -> list[str]:
    return DEEPSPEED + STAGES[stage]


NON_PRIVATE = ["privacy.enabled=false"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """backend=fsdp2 on one rank, noise off (the gradient of every step kept), and non-private."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    return run_jobs(1, tmp, [("exact", tiny_config(tmp / "exact"), ["capture=grads"]),
                             ("plain", tiny_config(tmp / "plain"), NON_PRIVATE)], launcher="python")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All the two-rank DeepSpeed runs that need no interruption, in one launch (a launch
    costs more than these tiny jobs): per stage noise off and noise on, bf16 at ZeRO 1-3,
    and the uninterrupted reference of the kill test."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    jobs = []
    for stage in STAGES:
        jobs.append((f"exact{stage}", tiny_config(tmp / f"exact{stage}"), [*_stage_config(stage), "capture=grads"]))
        jobs.append((f"noise{stage}", tiny_config(tmp / f"noise{stage}"),
                     [*_stage_config(stage), "capture=grads", f"privacy.noise_multiplier={SIGMA}"]))
    for stage in (1, 2, 3):
        jobs.append((f"bf16_{stage}", tiny_config(tmp / f"bf16_{stage}"),
                     [*_stage_config(stage), "capture=grads", "ds.bf16.enabled=true", "steps=2"]))
    jobs.append(("kill_ref", tiny_config(tmp / "kill_ref", **NOISY_CHECKPOINTED), _stage_config(2)))
    jobs.append(("plain", tiny_config(tmp / "plain"), [*_stage_config(2), *NON_PRIVATE]))
    before = _cpu_allreduce_buffers()
    done = run_jobs(2, tmp, jobs, launcher="deepspeed")
    return {**done, "shm_left_behind": _cpu_allreduce_buffers() - before}


def _cpu_allreduce_buffers() -> set[str]:
    return {p.name for p in cpu_allreduce_buffer(0).parent.glob("deepspeed_allreduce_buffer_*")}


def test_deepspeed_cpu_communication_buffers_are_not_left_in_shared_memory(runs):
    """DeepSpeed's CPU accelerator creates a 66 MB /dev/shm file per rank and never removes
    it; before the fix each launch of the fixture above left two (RAM held until reboot)."""
    assert runs["shm_left_behind"] == set()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_zero_stages_on_two_ranks_reach_the_same_parameters_as_fsdp2_on_one_rank(runs, one_rank, stage):
    """Noise off, fp32: the same clipped gradients at every step, the same parameters after 6."""
    out = runs[f"exact{stage}"]
    torch.manual_seed(3)
    init = TinyCaptioner().state_dict()
    assert max((one_rank["exact"]["params"][k] - init[k]).abs().max().item() for k in init) > 1e-2  # it trained
    for key, ref in one_rank["exact"]["params"].items():
        torch.testing.assert_close(out["params"][key], ref, rtol=1e-5, atol=1e-6, msg=key)  # measured 1.4e-7
    assert len(out["grads"]) == len(one_rank["exact"]["grads"]) == 6
    for ours, ref in zip(out["grads"], one_rank["exact"]["grads"]):
        torch.testing.assert_close(flat(ours), flat(ref), rtol=1e-5, atol=1e-7)
    # fp32 bytes per step: ZeRO-3 reduce-scatters each flat parameter (padded to 2 equal
    # partitions); the replicated stages reduce-scatter dim-0 chunks and all-gather them back
    shapes = [p.shape for p in init.values()]
    if stage == 3:
        assert out["bytes_per_step"] == 4 * sum(-(-s.numel() // 2) * 2 for s in shapes)
    else:
        assert out["bytes_per_step"] == 2 * 4 * sum(-(-s[0] // 2) * 2 * s[1:].numel() for s in shapes)


def test_a_non_private_deepspeed_run_equals_the_fsdp2_one(runs, one_rank):
    """privacy.enabled=false: DeepSpeed's own gradient path (ZeRO-2 reduce-scatter, micro-
    batches accumulated to the step's last) and step give FSDP2's parameters; DeepSpeed's
    default gradient clipping at 1.0 (which fsdp2 does not do) made them differ by 8e-2."""
    for key, ref in one_rank["plain"]["params"].items():
        torch.testing.assert_close(runs["plain"]["params"][key], ref, rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(one_rank["plain"]["params"]["head.weight"], one_rank["exact"]["params"]["head.weight"])


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_noise_is_sigma_c_over_b_once_per_coordinate_at_every_stage(runs, stage):
    """The gradient DeepSpeed steps from is the clipped sum plus N(0, sigma^2 C^2) per
    coordinate, over B: noised once (twice would be sqrt(2) too much, noise averaged over
    ranks sqrt(2) too little), by independent streams on the two ranks; replicated
    parameters end identical on both ranks."""
    out = runs[f"noise{stage}"]
    assert_noised_once_per_coordinate(out["grads"], SIGMA, clip=0.5, batch=32, world=2, flat_partitions=stage == 3)
    copies = out["rank_copies"]
    if stage < 3:  # every rank steps its own copy (stage 0) or takes its partition's update (ZeRO-1/2)
        assert torch.equal(copies[0], copies[1])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_gradient_matches_fp32_within_bf16_rounding(runs, one_rank, stage):
    """bf16 parameters (DeepSpeed's bf16.enabled, fp32 masters) at ZeRO 1-3: the first step's
    gradient equals the fp32 one within bf16 rounding; the model really ran in bf16."""
    out = runs[f"bf16_{stage}"]
    assert out["param_dtypes"] == ["torch.bfloat16"]
    ours, ref = flat(out["grads"][0]), flat(one_rank["exact"]["grads"][0])
    error = ((ours - ref).norm() / ref.norm()).item()
    assert error < 1e-2, error  # measured 0.0037 (ZeRO-2/3) and 0.0044 (ZeRO-1, bf16 gradient partitions)


def test_sigkill_midway_then_resume_under_deepspeed_is_bitwise_identical(tmp_path, runs):
    """ZeRO-2, noise on: killed after step 5 (its last checkpoint at step 4), resumed from the engine's own
    checkpoint and meta.json, it ends where the uninterrupted run ends, bit for bit."""
    ref = runs["kill_ref"]
    cfg = tiny_config(tmp_path, **NOISY_CHECKPOINTED)
    proc = start_worker(2, tmp_path, cfg, ["pause_at=5", *_stage_config(2)], launcher="deepspeed")
    kill_job(proc, paused_pids(tmp_path / "out.pt", 2, proc))
    assert not (tmp_path / "out.pt").exists()
    step = tmp_path / "ckpt" / "step_00000004"
    assert (step / "deepspeed").is_dir() and (step / "weights.pt").is_file()
    resumed = run_worker(2, tmp_path, cfg, _stage_config(2), launcher="deepspeed", name="again")
    assert resumed["resumed_from"] == str(step)
    for key, value in ref["params"].items():
        assert torch.equal(resumed["params"][key], value), key
    assert resumed["summary"]["epsilon_rdp"] == ref["summary"]["epsilon_rdp"]
    assert resumed["summary"]["step"] == 8


# --------------------------------------------------------------------------- configs

@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_ds_config_is_accepted_by_deepspeed(path):
    """DeepSpeed's own config class (what deepspeed.initialize reads) on one rank."""
    from deepspeed.runtime.config import DeepSpeedConfig

    config = DeepSpeedConfig(json.loads(path.read_text()))
    assert config.train_batch_size == config.train_micro_batch_size_per_gpu * config.gradient_accumulation_steps


CLUSTER = {"default": 1, "default_cpu": 1, "default_gpu": 1, "dpcap_base_tan64": 16, "vip_stage1": 64,
           "vip_stage2": 64, "dpcap_own": 1, "vip_own": 1,
           "finetune_own": 1}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_for_deepspeed_at_its_cluster_size(name):
    """The presets' ds_configs pass DeepSpeed and the private step's checks at the world
    size they are meant for (the paper: 16 nodes x 8 GPUs)."""
    geo = validate(load_config(name, DEEPSPEED), CLUSTER.get(name, 128), allow_non_private=True)
    assert geo.batch_size == geo.micro_batch * geo.accumulation * geo.world_size


@pytest.mark.parametrize("overrides, world, message", [
    (["ds.train_batch_size=500"], 1, "train_batch_size = train_micro_batch_size_per_gpu"),
    (["ds.gradient_clipping=1.0"], 1, "gradient_clipping"),
    (["ds.fp16={enabled: true}"], 1, "fp16.enabled"),
    (["ds.zero_optimization.stage=7"], 1, "DeepSpeed refuses it: .*stage"),
    (["ds.zero_optimization.stage=0", "ds.bf16.enabled=true"], 1, "zero_optimization.stage"),
    (["ds.zero_optimization.stage=3", "ds.bf16.enabled=true", "ds.data_types.grad_accum_dtype=bf16"], 1,
     "data_types.grad_accum_dtype"),
    (["ds.optimizer={type: SGD}"], 1, "optimizer.type 'SGD'"),
    (["ds.zero_optimization.stage=2", "ds.zero_optimization.offload_optimizer={device: cpu}"], 1,
     "offload_optimizer needs an optimizer section"),
    (["ds.torch_autocast={enabled: true}"], 1, "torch_autocast.enabled"),
    (["ds.managed_gradient_accumulation=false"], 1, "managed_gradient_accumulation"),
    (["ds.train_micro_batch_size_per_gpu=64"], 3, "ds.train_batch_size=384 or 576"),
])
def test_configs_deepspeed_or_the_private_step_cannot_honour_are_refused_naming_the_key(overrides, world, message):
    cfg = load_config("default", DEEPSPEED + overrides)
    with pytest.raises(ValueError, match=message):
        validate(cfg, world, allow_non_private=False)


def test_deepspeed_is_told_not_to_clip_the_noised_gradient():
    """DeepSpeed clips the global gradient norm to 1.0 by default; the private gradient is
    handed over noised and must be stepped from as it is."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from trainer.job.deepspeed_backend import engine_config

    for stage in STAGES:
        cfg = load_config("default", _stage_config(stage))
        config = DeepSpeedConfig(engine_config(cfg, validate(cfg, 1, allow_non_private=False)))
        assert config.gradient_clipping == 0.0
    assert DeepSpeedConfig({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8}).gradient_clipping == 1.0


def test_keys_a_backend_ignores_are_named_in_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        validate(load_config("default", ["ds.zero_optimization.stage=2"]), 1, allow_non_private=False)
    assert "backend fsdp2 ignores zero_optimization" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        validate(load_config("default", DEEPSPEED + ["ds.scheduler={type: WarmupLR}", "ds.prescale_gradients=true",
                                                    "ds.optimizer={type: AdamW, params: {lr: 0.1}}"]),
                 1, allow_non_private=False)
    assert "scheduler is ignored" in caplog.text and "prescale_gradients have no effect" in caplog.text
    assert "optimizer.params.lr=0.1 is replaced" in caplog.text


def test_dry_run_plans_the_deepspeed_job_and_refuses_a_geometry_that_does_not_divide():
    def dry(*args):
        return subprocess.run([sys.executable, "-m", "trainer.train", "--config", "dpcap_base_paper", "--dry-run",
                               *args], cwd=REPO, capture_output=True, text=True, timeout=120)

    out = dry("--world-size", "128", "backend=deepspeed")
    assert out.returncode == 0, out.stderr
    assert "backend deepspeed: ZeRO stage 2" in out.stdout and "80 accumulation steps" in out.stdout
    out = dry("backend=deepspeed", "--world-size", "100")  # options and overrides in any order
    assert out.returncode == 2 and "ds.train_batch_size=" in out.stderr

