"""DCP checkpoints: SIGKILL resume exactness, resharding, atomicity, SIGTERM, privacy guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers.jobs import paused_pids, run_jobs, run_worker, start_worker, worker_command
from tests.helpers.noise import SIGMA, flat
from tests.helpers.processes import REPO, kill_job, output_by_deadline
from tests.helpers.standin import NOISY_CHECKPOINTED, TINY_MODEL, tiny_config
from tests.helpers.worker import gate_files
from trainer.common.checkpoints import read_meta
from trainer.job.checkpointer import Checkpointer

SECRET = {"privacy.secret_seed": None}  # the production path: a fresh secret seed, kept in the checkpoints


def test_sigkill_midway_then_resume_restores_the_secret_seed_and_is_bitwise_identical(tmp_path):
    """No privacy.secret_seed (the production path): killed after step 5, its last checkpoint
    at step 4, the run resumes with the secret seed of the checkpoint and ends where an
    uninterrupted run with that seed ends, bit for bit. (A fresh secret on resume would draw
    other noise and other batches from step 5 on.)"""
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(run, **{**NOISY_CHECKPOINTED, **SECRET})
    proc = start_worker(2, run, cfg, ["pause_at=5"])
    kill_job(proc, paused_pids(run / "out.pt", 2, proc))
    assert not (run / "out.pt").exists()
    done = Checkpointer(run / "ckpt", 2, 0).latest()
    assert done is not None and done.name == "step_00000004"
    secret = read_meta(done)["engine"]["seed"]
    ref_cfg = tiny_config(tmp_path / "ref", **{**NOISY_CHECKPOINTED, "privacy.secret_seed": secret})
    out = run_jobs(2, tmp_path, [("again", cfg, []), ("ref", ref_cfg, [])])
    resumed, ref = out["again"], out["ref"]
    assert resumed["resumed_from"] == str(done)
    for key, value in ref["params"].items():
        assert torch.equal(resumed["params"][key], value), key
    assert resumed["summary"]["epsilon_rdp"] == ref["summary"]["epsilon_rdp"]
    assert resumed["summary"]["step"] == 8


def _correlation(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return torch.corrcoef(torch.stack([flat(a), flat(b)]))[0, 1].item()


def test_resume_on_a_different_number_of_ranks(tmp_path):
    """2 ranks for 3 steps, then 3 ranks to step 6. Noise off: == 1 rank for 6 steps. Noise on,
    with a fresh secret seed: the 3-rank steps draw the noise an uninterrupted 3-rank run with
    the checkpoint's secret draws at those steps, and not that of any earlier step again."""
    one = run_worker(1, tmp_path, tiny_config(tmp_path / "one"), launcher="python", name="one")
    cfg = tiny_config(tmp_path / "two")
    noisy = {"privacy.noise_multiplier": SIGMA}
    resumed_cfg = tiny_config(tmp_path / "noisy", **noisy, **SECRET)
    run_jobs(2, tmp_path, [("two", cfg, ["steps=3"]), ("noisy_two", resumed_cfg, ["steps=3"])])
    secret = read_meta(tmp_path / "noisy" / "ckpt" / "step_00000003")["engine"]["seed"]
    uninterrupted_cfg = tiny_config(tmp_path / "ref", **noisy, **{"privacy.secret_seed": secret})
    out = run_jobs(3, tmp_path, [("three", cfg, []), ("noisy_three", resumed_cfg, ["capture=grads"]),
                                 ("uninterrupted", uninterrupted_cfg, ["capture=grads"])])
    assert out["three"]["summary"]["step"] == 6
    for key, ref in one["params"].items():
        torch.testing.assert_close(out["three"]["params"][key], ref, rtol=1e-5, atol=1e-6, msg=key)
    # the gradients are noise within 6% (norm), and 715 coordinates: independent draws
    # correlate within +-0.04 (one standard error; measured -0.04 to 0.10), the same draws above 0.999
    resumed, uninterrupted = out["noisy_three"]["grads"], out["uninterrupted"]["grads"]
    assert out["noisy_three"]["resumed_from"] is not None and len(resumed) == 3 and len(uninterrupted) == 6
    for step, grads in enumerate(resumed, start=4):
        for earlier, reference in enumerate(uninterrupted, start=1):
            corr = _correlation(grads, reference)
            assert (corr > 0.99) if earlier == step else (abs(corr) < 0.2), (step, earlier, corr)


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


def _signal_at_step_two(tmp_path: Path, world: int, signum: int, rank: int) -> dict:
    """Send ``signum`` to one rank while every rank waits before its third step; the run
    should finish that step, save, and exit 0. Returns what rank 0 saved."""
    proc = start_worker(world, tmp_path, tiny_config(tmp_path, steps=50), ["pause_at=2"],
                        launcher="python" if world == 1 else "torchrun")
    pids = paused_pids(tmp_path / "out.pt", world, proc)
    os.kill(pids[rank], signum)
    # the handler runs as soon as the signal arrives (at the rank's next bytecode), long
    # before the step the open gate lets run ends at the next stop check
    gate_files(tmp_path / "out.pt", 0)[1].touch()
    # one step and a save: seconds
    _, err = output_by_deadline(proc, 120, f"{world} ranks did not exit within 120 s of signal {signum} to rank {rank}",
                                kill=lambda: kill_job(proc, pids))
    assert proc.returncode == 0, err[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=True)


def test_sigterm_saves_at_the_end_of_the_step_and_exits_cleanly(tmp_path):
    summary = _signal_at_step_two(tmp_path, 1, signal.SIGTERM, rank=0)["summary"]
    assert summary["step"] == 3 and summary["stopped_early"]
    assert Checkpointer(tmp_path / "ckpt", 2, 0).latest().name == "step_00000003"


def test_sigusr1_to_one_rank_of_two_stops_both_at_the_same_step_with_a_whole_checkpoint(tmp_path):
    """SIGUSR1 (what a cluster scheduler sends before preempting) to rank 1 only: rank 0 learns
    of it at the next step's stop check, so both stop after the same step, save it together
    (every rank's shard) and exit; nobody waits forever at a collective."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = _signal_at_step_two(tmp_path, 2, signal.SIGUSR1, rank=1)
    assert out["summary"]["step"] == 3 and out["summary"]["stopped_early"]
    latest = Checkpointer(tmp_path / "ckpt", 2, 0).latest()
    assert latest.name == "step_00000003" and read_meta(latest)["train_state"]["world_size"] == 2
    dcp_to_torch_save(latest, tmp_path / "whole.pt")  # reads both ranks' shards
    saved = torch.load(tmp_path / "whole.pt", weights_only=True)["app"]["model"]
    for key, value in out["params"].items():
        assert torch.equal(saved[key], value), key


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
        return read_meta(run / "ckpt" / f"step_{step:08d}")["train_state"]["sampling_seed"]

    first, second = tmp_path / "first", tmp_path / "second"
    run_worker(1, tmp_path, tiny_config(first, **noisy), launcher="python", name="first")
    run_worker(1, tmp_path, tiny_config(second, **noisy), launcher="python", name="second")
    seed = sampling_seed(first, 2)
    assert seed != sampling_seed(second, 2)  # fresh secret per run, same public config seed
    assert seed != tiny_config(first)["seed"]
    run_worker(1, tmp_path, tiny_config(first, **noisy), ["steps=3"], launcher="python", name="resumed")
    assert sampling_seed(first, 3) == seed


def test_shards_read_by_loader_workers_resume_exactly(tmp_path):
    """The real reader: webdataset shards (synthetic, written by the first job), two DataLoader
    worker processes, crops and flips, the real DP-Cap, noise on, a fresh secret seed. 2 steps,
    then resumed to 4 == 4 steps at once with the checkpoint's secret, bit for bit."""
    real = [*TINY_MODEL, "model.name=dpcap_nano", f"data.shards={tmp_path / 'shards'}", "data.num_workers=2",
            "data.augment=true", "data.text_length=16", "ds.train_micro_batch_size_per_gpu=16"]
    resumed = tiny_config(tmp_path / "resumed", **{**NOISY_CHECKPOINTED, **SECRET})
    run_worker(1, tmp_path, resumed, [*real, "steps=2"], launcher="python", name="half")
    secret = read_meta(tmp_path / "resumed" / "ckpt" / "step_00000002")["engine"]["seed"]
    whole = tiny_config(tmp_path / "whole", **{**NOISY_CHECKPOINTED, "privacy.secret_seed": secret})
    out = run_jobs(1, tmp_path, [("again", resumed, [*real, "steps=4"]), ("whole", whole, [*real, "steps=4"])],
                   launcher="python")
    assert out["whole"]["resumed_from"] is None and out["again"]["resumed_from"].endswith("step_00000002")
    assert out["again"]["summary"]["step"] == 4
    for key, value in out["whole"]["params"].items():
        assert torch.equal(out["again"]["params"][key], value), key


def _as_flat_layout(meta: dict) -> dict:
    """meta.json as the trainer wrote it before it was keyed by component (format 1)."""
    state = meta["train_state"]
    return {"step": state["step"], "sampling_seed": state["sampling_seed"], "lineage": state["lineage"],
            "backend": state["backend"], "world_size": state["world_size"], "config": meta["config"],
            "privacy": {k: v for k, v in meta["privacy"].items() if k != "epsilon_rdp"},
            "epsilon_rdp": meta["privacy"]["epsilon_rdp"], "engine": meta["engine"],
            "reader": {k: v for k, v in meta["reader"].items() if k != "next_step"} | {"next_step": 0},
            "run_id": meta["run_id"]}


def test_a_checkpoint_of_the_flat_layout_resumes_bit_for_bit(tmp_path):
    """A checkpoint written before meta.json was keyed by component is read as if written now:
    resumed, the run ends where an uninterrupted one ends, bit for bit, on the same ledger."""
    cfg = tiny_config(tmp_path, **{**NOISY_CHECKPOINTED, "steps": 2})
    run_worker(1, tmp_path, cfg, launcher="python", name="first")
    step = tmp_path / "ckpt" / "step_00000002"
    meta = json.loads((step / "meta.json").read_text())
    assert meta["format"] == 2 and set(meta) >= {"train_state", "privacy", "engine", "reader", "metrics"}
    flat = _as_flat_layout(meta)
    # one lacking what a resume needs is refused, naming it
    (step / "meta.json").write_text(json.dumps({k: v for k, v in flat.items() if k != "reader"}))
    (tmp_path / "lacking.json").write_text(json.dumps(cfg))
    lacking = subprocess.run(worker_command(1, tmp_path / "lacking.json", tmp_path / "lacking.pt", ["steps=4"],
                                            "python"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert lacking.returncode != 0 and "has no 'reader' entry" in lacking.stderr, lacking.stderr[-3000:]
    (step / "meta.json").write_text(json.dumps(flat))
    out = run_jobs(1, tmp_path, [("again", cfg, ["steps=4"]),
                                 ("ref", tiny_config(tmp_path / "ref", **{**NOISY_CHECKPOINTED, "steps": 4}), [])], "python")
    resumed, ref = out["again"], out["ref"]
    assert resumed["resumed_from"] == str(step)
    for key, value in ref["params"].items():
        assert torch.equal(resumed["params"][key], value), key
    assert resumed["summary"]["epsilon_rdp"] == ref["summary"]["epsilon_rdp"]
    assert read_meta(tmp_path / "ckpt" / "step_00000004")["train_state"]["lineage"] == meta["train_state"]["lineage"]
