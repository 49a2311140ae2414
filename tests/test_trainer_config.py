"""Configs, presets, validation, the dry-run plan, launcher environments, the schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import models
from tests.helpers.processes import REPO
from trainer.common.config import PRESETS, JobConfig, ModelConfig, learning_rate, load_config
from trainer.common.heldout import HeldOut
from trainer.common.inputs import transform
from trainer.job.distributed import launcher_env
from trainer.job.geometry import geometry
from trainer.job.optim import lr_factor
from trainer.job.validation import validate


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name):
    cfg = load_config(name)
    validate(cfg, world_size=8, allow_non_private=True)


def test_default_says_which_preset_it_is(caplog):
    """``default`` is default_cpu without CUDA (default_gpu with it), and the log says so."""
    with caplog.at_level("INFO", logger="trainer.common.config"):
        cfg = load_config("default")
    assert "--config default: default_cpu on this machine (CUDA not available)" in caplog.text
    assert cfg.to_dict() == load_config("default_cpu").to_dict()


def test_no_preset_is_named_like_a_model_and_the_old_name_says_the_new(tmp_path):
    assert not set(PRESETS) & set(models.REGISTRY)
    with pytest.raises(ValueError, match="--config vip_base: the preset is now called vip_stage2"):
        load_config("vip_base")
    (tmp_path / "job.json").write_text(json.dumps({"preset": "vip_base"}))
    with pytest.raises(ValueError, match="preset vip_base: the preset is now called vip_stage2"):
        load_config(str(tmp_path / "job.json"))


@pytest.mark.parametrize("name, overrides, zero_shot", [
    ("default", [], True), ("dpcap_own", [], True), ("vip_own", [], False), ("vip_stage2", [], False),
    ("default", ["model.name=vip_base"], False), ("vip_own", ["model.name=dpcap_nano"], True),
    ("default", ["eval.zero_shot=false"], False),
])
def test_zero_shot_follows_the_model_unless_set(name, overrides, zero_shot):
    """ViP has no text side: its jobs need no eval.zero_shot=false (explicit true is refused)."""
    cfg = load_config(name, overrides)
    assert cfg.eval.zero_shot is zero_shot
    validate(cfg, world_size=64, allow_non_private=True)
    with pytest.raises(ValueError, match="eval.zero_shot must be true, false or null"):
        load_config(name, ["eval.zero_shot=maybe"])


def test_img_size_is_the_override_else_the_models_own():
    small = load_config("vip_own")
    assert small.img_size == 32 == HeldOut.of(small).img_size == transform(small, None).img_size
    for name in ("dpcap_nano", "vip_base"):
        cfg = JobConfig(model=ModelConfig(name=name))
        assert cfg.img_size == models.REGISTRY[name][1].img_size == transform(cfg, None).img_size
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        JobConfig(model=ModelConfig(name="resnet")).img_size


def test_dpcap_paper_recipe():
    cfg = load_config("dpcap_base_paper")
    assert cfg.ds["train_batch_size"] == 1_310_720 and cfg.ds["train_micro_batch_size_per_gpu"] == 128
    assert cfg.privacy.noise_multiplier == 0.728 and cfg.privacy.max_grad_norm == 1.0
    assert cfg.steps == 5708 and cfg.optim.warmup_steps == 2000 and cfg.optim.decay_steps == 10_000
    assert learning_rate(cfg) == pytest.approx(5.12e-4)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.005
    assert cfg.privacy.delta == pytest.approx(1 / 233_804_767)
    geo = validate(cfg, world_size=128, allow_non_private=False)
    assert geo.accumulation == 80  # 1,310,720 / (128 x 128)


def test_vip_stage2_recipe():
    cfg = load_config("vip_stage2")
    assert cfg.ds["train_batch_size"] == 81_920 and cfg.privacy.noise_multiplier == 0.5
    assert cfg.privacy.max_grad_norm == 0.1 and cfg.steps == 10_000 and cfg.optim.warmup_steps == 1000
    assert learning_rate(cfg) == pytest.approx(1.5e-5 * 81_920 / 256)
    with pytest.raises(ValueError, match="--allow-non-private"):
        validate(load_config("vip_stage1"), 1, allow_non_private=False)


def test_overrides_and_files(tmp_path):
    cfg = load_config("default", ["privacy.noise_multiplier=0.9", "ds.train_batch_size=128",
                                  "model.overrides.depth=2", "optim.betas=[0.8, 0.9]"])
    assert cfg.privacy.noise_multiplier == 0.9 and cfg.ds["train_batch_size"] == 128
    assert cfg.model.overrides["depth"] == 2 and cfg.optim.betas == (0.8, 0.9)
    f = tmp_path / "job.yaml"
    f.write_text("preset: dpcap_base_paper\nsteps: 10\nprivacy:\n  noise_multiplier: 1.1\n")
    cfg = load_config(str(f))
    assert cfg.steps == 10 and cfg.privacy.noise_multiplier == 1.1 and cfg.optim.warmup_steps == 2000
    j = tmp_path / "job.json"
    j.write_text(json.dumps({"preset": "default", "ds_config": "dpcap_tan64.json"}))
    assert load_config(str(j)).ds["train_batch_size"] == 20_480


@pytest.mark.parametrize("overrides, message", [
    (["privacy.enabled=false"], "--allow-non-private"),
    (["privacy.target_epsilon=null"], "noise_multiplier or privacy.target_epsilon"),
    (["privacy.noise_multiplier=-1"], "noise_multiplier must be >= 0"),
    (["privacy.delta=0.5"], "exceeds 1/N"),
    (["ds.gradient_clipping=1.0"], "gradient_clipping"),
    (["ds.gradient_accumulation_steps=3"], "train_batch_size 512"),
    (["ds.fp16={enabled: true}"], "fp16"),
    (["ds.train_batch_size=100000"], "exceeds data.num_examples"),
    (["privacy.tan_reference_batch=16"], "tan_reference_batch"),
    (["optim.warmup_steps=1000"], "warmup_steps"),
    (["privacy.accountant=gdp"], "rdp or pld"),
    (["model.name=vip_base", "eval.zero_shot=true"], "eval.zero_shot needs a DP-Cap"),
    (["privacy.bogus=1"], "unknown config key"),
    (["steps=many"], "steps must be a int"),
])
def test_invalid_settings_are_refused_with_a_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(load_config("default", overrides), world_size=1, allow_non_private=False)


def test_geometry_follows_the_world_size():
    cfg = load_config("default", ["ds.gradient_accumulation_steps=2"])
    assert geometry(cfg, 2).accumulation == 2  # 512 = 128 x 2 x 2
    with pytest.raises(ValueError):
        geometry(cfg, 1)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "trainer.train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_paper_plan():
    out = _cli("--config", "dpcap_base_paper", "--dry-run", "--world-size", "128")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "B = 1,310,720" in text and "80 accumulation steps" in text and "sigma = 0.728" in text
    last = next(line for line in text.splitlines() if "(100%)" in line)
    rdp, pld = (float(x) for x in last.split(":")[-1].split("/"))
    assert rdp == pytest.approx(8.05, abs=0.01) and pld == pytest.approx(7.34, abs=0.05)
    assert "( 50%)" in text and "B/64" in text and "sigma' = 0.01137" in text


def test_dry_run_target_epsilon_and_tan():
    out = _cli("--config", "dpcap_base_eps8", "--dry-run", "--world-size", "128")
    assert out.returncode == 0, out.stderr
    assert "calibrated for target epsilon 8.0" in out.stdout
    last = next(line for line in out.stdout.splitlines() if "(100%)" in line)
    assert float(last.split(":")[-1].split("/")[0]) == pytest.approx(8.0, abs=0.01)
    out = _cli("--config", "dpcap_base_tan64", "--dry-run", "--world-size", "16")
    assert out.returncode == 0, out.stderr
    assert "TAN simulation of B_ref = 1,310,720" in out.stdout and "sigma = 0.011375" in out.stdout


def test_cli_errors_exit_2_before_any_work():
    out = _cli("--config", "default", "privacy.enabled=false")
    assert out.returncode == 2 and "--allow-non-private" in out.stderr
    out = _cli("--config", "nope")
    assert out.returncode == 2 and "neither a preset" in out.stderr


@pytest.mark.parametrize("env, arg, expected", [
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, None, (3, 1, 4)),  # torchrun
    ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, 0, (2, 0, 4)),  # deepspeed + --local_rank
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
      "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.1"}, None, (5, 1, 8)),
    ({}, None, (0, 0, 1)),
])
def test_launcher_environments(monkeypatch, env, arg, expected):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                "MASTER_ADDR", "MASTER_PORT", "SLURM_LAUNCH_NODE_IPADDR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = dict(os.environ)
    assert launcher_env(arg) == expected
    assert dict(os.environ) == before  # reading the launcher's environment changes nothing


def test_warmup_then_cosine():
    assert lr_factor(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(5707, 2000, 10_000, 0.0) > 0.5  # the paper stops before its cosine horizon


def test_options_and_overrides_in_any_order():
    from trainer.train import parse_args

    args = parse_args(["--config", "vip_stage2", "--init", "runs/v1/checkpoints", "steps=60"])
    assert args.config == "vip_stage2" and args.init == "runs/v1/checkpoints" and args.overrides == ["steps=60"]
    # plain parse_args stopped collecting overrides at the first option: "unrecognized arguments"
    args = parse_args(["steps=60", "--config", "default", "backend=deepspeed", "--dry-run", "ds.train_batch_size=64",
                       "--local_rank=1"])
    assert args.overrides == ["steps=60", "backend=deepspeed", "ds.train_batch_size=64"]
    assert args.dry_run and args.local_rank == 1
