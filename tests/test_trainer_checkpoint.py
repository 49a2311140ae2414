"""DCP checkpoints: SIGKILL resume exactness, resharding, atomicity, SIGTERM, privacy guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from test_trainer_worker import REPO, run_worker, tiny_config, worker_command
from trainer.common.checkpoints import read_meta
from trainer.job.checkpoint import Checkpointer

NOISY = {"privacy.noise_multiplier": 1.0, "privacy.secret_seed": 7, "steps": 8, "checkpoint.every_steps": 2}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_sigkill_midway_then_resume_is_bitwise_identical(tmp_path):
    ref = run_worker(2, tmp_path, tiny_config(tmp_path / "ref", **NOISY), name="ref")
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(run, **NOISY)
    (run / "c.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(worker_command(2, run / "c.json", run / "out.pt", ["delay=0.4"]),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for(run / "ckpt" / "step_00000004" / "meta.json", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "out.pt").exists()
    done = Checkpointer(run / "ckpt", 2, 0).latest()
    assert done is not None and int(done.name[5:]) < 8
    resumed = run_worker(2, run, cfg, name="again")
    for key, value in ref["params"].items():
        assert torch.equal(resumed["params"][key], value), key
    assert resumed["summary"]["epsilon_rdp"] == ref["summary"]["epsilon_rdp"]
    assert resumed["summary"]["step"] == 8


def test_resume_on_a_different_number_of_ranks(tmp_path):
    """2 ranks for 3 steps, then 3 ranks to step 6 == 1 rank for 6 steps (noise off)."""
    one = run_worker(1, tmp_path, tiny_config(tmp_path / "one"), launcher="python", name="one")
    cfg = tiny_config(tmp_path / "two")
    run_worker(2, tmp_path, cfg, ["steps=3"], name="two")
    out = run_worker(3, tmp_path, cfg, name="three")
    assert out["summary"]["step"] == 6
    for key, ref in one["params"].items():
        torch.testing.assert_close(out["params"][key], ref, rtol=1e-5, atol=1e-6, msg=key)


def test_incomplete_saves_are_ignored_and_only_the_last_k_kept(tmp_path):
    cfg = tiny_config(tmp_path, **{"checkpoint.every_steps": 1, "checkpoint.keep_last": 2, "steps": 4})
    run_worker(1, tmp_path, cfg, launcher="python")
    ckpt = Checkpointer(tmp_path / "ckpt", 2, 0)
    assert [p.name for p in ckpt.complete()] == ["step_00000003", "step_00000004"]
    # a save killed before its rename, and a folder without meta.json, are never resumed from
    (tmp_path / "ckpt" / ".tmp-step_00000009").mkdir()
    (tmp_path / "ckpt" / "step_00000010").mkdir()
    assert ckpt.latest().name == "step_00000004"
    out = run_worker(1, tmp_path, cfg, ["steps=5"], launcher="python", name="more")
    assert out["summary"]["step"] == 5
    assert not (tmp_path / "ckpt" / ".tmp-step_00000009").exists()


def test_a_damaged_checkpoint_is_named_kept_and_the_previous_one_is_a_rename_away(tmp_path):
    cfg = tiny_config(tmp_path, **{"checkpoint.every_steps": 1, "checkpoint.keep_last": 2, "steps": 4})
    run_worker(1, tmp_path, cfg, launcher="python")
    damaged = tmp_path / "ckpt" / "step_00000004"
    shard = next(damaged.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a transfer cut short
    (tmp_path / "more.json").write_text(json.dumps(cfg))
    proc = subprocess.run(worker_command(1, tmp_path / "more.json", tmp_path / "more.pt", ["steps=5"], "python"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    message = next(line for line in proc.stderr.splitlines() if "cannot load checkpoint" in line)
    assert str(damaged) in message and "RuntimeError" in message
    assert shard.exists() and (damaged / "meta.json").exists()  # nothing deleted
    source, target = message.rsplit("mv ", 1)[1].split()
    os.rename(source, target)
    out = run_worker(1, tmp_path, cfg, ["steps=5"], launcher="python", name="again")
    assert out["resumed_from"] == str(tmp_path / "ckpt" / "step_00000003")
    assert out["summary"]["step"] == 5 and Path(target).is_dir()
    # resumed from step 3: steps 4 and 5 saved anew, the damaged one kept aside
    assert [p.name for p in Checkpointer(tmp_path / "ckpt", 2, 0).complete()] == ["step_00000004",
                                                                                   "step_00000005"]


def test_sigterm_saves_at_the_end_of_the_step_and_exits_cleanly(tmp_path):
    cfg = tiny_config(tmp_path, steps=50)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(worker_command(1, tmp_path / "c.json", tmp_path / "out.pt", ["delay=0.2"],
                                           launcher="python"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "tb", proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = torch.load(tmp_path / "out.pt", weights_only=True)["summary"]
    assert 0 < summary["step"] < 50 and summary["stopped_early"]
    assert Checkpointer(tmp_path / "ckpt", 2, 0).latest().name == f"step_{summary['step']:08d}"


def test_changed_privacy_on_resume_is_refused_unless_allowed(tmp_path):
    cfg = tiny_config(tmp_path, **{"privacy.noise_multiplier": 1.0, "steps": 3})
    run_worker(1, tmp_path, cfg, launcher="python")
    (tmp_path / "c2.json").write_text(json.dumps(cfg))
    proc = subprocess.run(worker_command(1, tmp_path / "c2.json", tmp_path / "x.pt",
                                         ["steps=5", "privacy.noise_multiplier=2.0"], launcher="python"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "privacy.allow_privacy_change" in proc.stderr
    out = run_worker(1, tmp_path, cfg, ["steps=5", "privacy.noise_multiplier=2.0",
                                        "privacy.allow_privacy_change=true"], launcher="python", name="ok")
    from privacy.accounting import epsilon_of_segments

    q, delta = 32 / 96, 1e-3
    assert out["summary"]["epsilon_rdp"] == pytest.approx(
        epsilon_of_segments([(1.0, q, 3), (2.0, q, 2)], delta, "rdp"), rel=1e-9)
    assert out["summary"]["epsilon_rdp"] < epsilon_of_segments([(1.0, q, 5)], delta, "rdp")


def test_guard_stops_before_the_target_epsilon(tmp_path):
    from privacy.accounting import epsilon_of_segments

    q, delta = 32 / 96, 1e-3
    target = epsilon_of_segments([(1.0, q, 4)], delta, "rdp") * 1.001
    cfg = tiny_config(tmp_path, **{"privacy.noise_multiplier": 1.0, "privacy.target_epsilon": target,
                                   "steps": 10})
    out = run_worker(1, tmp_path, cfg, launcher="python")
    assert out["summary"]["step"] == 4 and out["summary"]["stopped_early"]
    assert out["summary"]["epsilon_rdp"] <= target


def test_sampling_seed_is_secret_and_survives_resume(tmp_path):
    """Private runs draw batches from a secret seed (not the public config seed), saved
    in the checkpoint and reused on resume so the resumed run draws the same batches."""
    noisy = {"privacy.noise_multiplier": 1.0, "privacy.secret_seed": None, "steps": 2,
             "checkpoint.every_steps": 1}

    def sampling_seed(run: Path, step: int) -> int:
        return read_meta(run / "ckpt" / f"step_{step:08d}")["sampling_seed"]

    first, second = tmp_path / "first", tmp_path / "second"
    run_worker(1, tmp_path, tiny_config(first, **noisy), launcher="python", name="first")
    run_worker(1, tmp_path, tiny_config(second, **noisy), launcher="python", name="second")
    seed = sampling_seed(first, 2)
    assert seed != sampling_seed(second, 2)  # fresh secret per run, same public config seed
    assert seed != tiny_config(first)["seed"]
    run_worker(1, tmp_path, tiny_config(first, **noisy), ["steps=3"], launcher="python", name="resumed")
    assert sampling_seed(first, 3) == seed
