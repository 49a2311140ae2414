"""Ranks that agree before they train, continuations that never reuse noise, and the job's
other refusals: synthetic data into someone's shards, configs and meta.json nested too deep,
--init's own epsilon, sampled indices in the log.

The disagreeing ranks are real: two processes started by hand (as srun starts them), each
with its own config file, so that each genuinely sees other files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.helpers.jobs import run_jobs, run_worker, start_rank, worker_command
from tests.helpers.processes import PY, REPO, free_port, kill_group, output_by_deadline
from tests.helpers.standin import TINY_DPCAP_ON_SHARDS, tiny_config
from trainer.common.checkpoints import CheckpointError, read_meta

NOISY = {"privacy.noise_multiplier": 1.0, "privacy.secret_seed": None, "steps": 2, "checkpoint.every_steps": 2}


def _two_ranks(tmp: Path, configs: list[dict], overrides=((), ())) -> list[str]:
    """Rank r runs configs[r] with overrides[r]; both must fail. Their stderr, by rank."""
    port, errors = free_port(), []
    procs = []
    for rank, cfg in enumerate(configs):
        (tmp / f"rank{rank}.json").write_text(json.dumps(cfg))
        procs.append(start_rank(rank, 2, port, tmp / f"rank{rank}.json", tmp / "out.pt", overrides[rank]))

    def kill_waiting_ranks():
        for p in procs:
            if p.poll() is None:
                kill_group(p)

    for proc in procs:
        _, err = output_by_deadline(proc, 300, "a rank waited instead of failing", kill=kill_waiting_ranks)
        assert proc.returncode != 0, err[-3000:]
        errors.append(err)
    assert not (tmp / "out.pt").exists()
    return errors


def _message(err: str) -> str:
    return next(line for line in err.splitlines() if "ValueError: the ranks disagree" in line)


def test_a_rank_that_does_not_see_the_checkpoint_rank_0_resumes_stops_every_rank(tmp_path):
    """Rank 1's checkpoint folder lacks the step rank 0 resumes (stale listing, another mount):
    alone, rank 1 would start from step 0 with fresh seeds beside rank 0 at step 2."""
    first = tiny_config(tmp_path / "r0", **NOISY)
    run_worker(1, tmp_path, first, launcher="python", name="first")
    errors = _two_ranks(tmp_path, [tiny_config(tmp_path / "r0", **{**NOISY, "steps": 4}),
                                   tiny_config(tmp_path / "r1", **{**NOISY, "steps": 4})])
    for err in errors:
        message = _message(err)
        assert "step_00000002" in message and "rank 1 has" in message and "visible=False" in message, message


def test_ranks_that_loaded_different_checkpoints_stop_naming_rank_and_field(tmp_path):
    """Rank 1 sees a step_00000002 of another run (same name, other secret seeds): both ranks
    stop before training, naming rank 1 and the seeds, not their values."""
    for run in ("a", "b"):
        run_worker(1, tmp_path, tiny_config(tmp_path / run, **NOISY), launcher="python", name=run)
    errors = _two_ranks(tmp_path, [tiny_config(tmp_path / "a", **{**NOISY, "steps": 4}),
                                   tiny_config(tmp_path / "b", **{**NOISY, "steps": 4})])
    secret = str(read_meta(tmp_path / "b" / "ckpt" / "step_00000002")["engine"]["seed"])
    for err in errors:
        message = _message(err)
        assert "rank 1 has noise seed (hash)" in message and "rank 1 has sampling seed (hash)" in message, message
        assert "step=" not in message and secret not in err


def test_ranks_reading_different_shards_stop_naming_the_shard_list(tmp_path):
    """Same N, other shards: rank 1's data.shards names another folder."""
    from data.shards import write_shards
    from data.sources import synthetic_examples

    for name, seed in (("s0", 0), ("s1", 1)):
        write_shards(synthetic_examples(96, seed, 32), tmp_path / name)
    configs = [tiny_config(tmp_path / "run", steps=2) for _ in range(2)]
    errors = _two_ranks(tmp_path, configs, [[*TINY_DPCAP_ON_SHARDS, f"data.shards={tmp_path / s}"] for s in ("s0", "s1")])
    for err in errors:
        message = _message(err)
        assert "rank 1 has shard list and counts (hash)" in message and "data.num_examples" not in message, message


def _seeds(folder: Path) -> tuple[int, int]:
    meta = read_meta(folder)
    return meta["engine"]["seed"], meta["train_state"]["sampling_seed"]


def test_continuations_of_one_checkpoint_never_share_noise_but_a_requeue_does(tmp_path):
    """A copied checkpoint folder and an lr sweep from the same checkpoint each get a fresh salt
    (recorded, logged, with the reason), so neither draws the original's noise or batches nor
    each other's; a plain requeue (only steps changed) keeps them, bit for bit."""
    run_worker(1, tmp_path, tiny_config(tmp_path / "orig", **NOISY), launcher="python", name="first")
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    parent = _seeds(tmp_path / "orig" / "ckpt" / "step_00000002")
    parent_id = read_meta(tmp_path / "orig" / "ckpt" / "step_00000002")["train_state"]["lineage"]["id"]
    cfg = tiny_config(tmp_path / "copy", **{**NOISY, "steps": 3})
    (tmp_path / "copy.json").write_text(json.dumps(cfg))
    proc = subprocess.run(worker_command(1, tmp_path / "copy.json", tmp_path / "copy.pt", [], "python"),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "as a new branch" in proc.stderr and "a copied or another run's checkpoint folder" in proc.stderr
    run_jobs(1, tmp_path, [("sweep", tiny_config(tmp_path / "orig", **{**NOISY, "steps": 3, "optim.lr": 0.02}), []),
                           ("requeue", tiny_config(tmp_path / "orig", **{**NOISY, "steps": 4, "optim.lr": 0.02}),
                            [])], launcher="python")
    copy_meta, sweep_meta = (read_meta(tmp_path / r / "ckpt" / "step_00000003") for r in ("copy", "orig"))
    requeue_meta = read_meta(tmp_path / "orig" / "ckpt" / "step_00000004")
    copy, sweep = _seeds(tmp_path / "copy" / "ckpt" / "step_00000003"), (sweep_meta["engine"]["seed"],
                                                                        sweep_meta["train_state"]["sampling_seed"])
    assert len({parent[0], copy[0], sweep[0]}) == 3 and len({parent[1], copy[1], sweep[1]}) == 3
    assert "optim.lr" in sweep_meta["train_state"]["lineage"]["salts"][0]["reasons"][0]
    assert copy_meta["train_state"]["lineage"]["checkpoint_dir"] == os.path.realpath(tmp_path / "copy" / "ckpt")
    assert copy_meta["train_state"]["lineage"]["parent"] == sweep_meta["train_state"]["lineage"]["parent"] == parent_id
    # the sweep's own requeue: its seeds, its lineage, no new salt
    assert (requeue_meta["engine"]["seed"], requeue_meta["train_state"]["sampling_seed"]) == sweep
    assert requeue_meta["train_state"]["lineage"] == sweep_meta["train_state"]["lineage"]


def test_a_synthetic_preset_never_writes_into_someone_elses_shards(tmp_path):
    from trainer.common.config import load_config
    from trainer.job.training_data import prepare_shards

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "000000.tar").write_bytes(b"another tool's shard")
    small = ["data.num_examples=64", "model.overrides.img_size=16", f"name={tmp_path / 'job'}"]
    with pytest.raises(ValueError, match="not empty and was not written by a synthetic job"):
        prepare_shards(load_config("default", [f"data.shards={mine}", *small]), None)
    assert sorted(p.name for p in mine.iterdir()) == ["000000.tar"]
    # its own earlier shards are reused as they are
    ours = tmp_path / "ours"
    first = prepare_shards(load_config("default", [f"data.shards={ours}", *small]), None)
    stamps = {p: p.stat().st_mtime_ns for p in ours.iterdir()}
    again = prepare_shards(load_config("default", [f"data.shards={ours}", *small]), None)
    assert sum(again.counts) == sum(first.counts) == 64
    assert {p: p.stat().st_mtime_ns for p in ours.iterdir()} == stamps


def test_dry_run_indexes_good_shards_and_prints_n(tmp_path):
    from data.shards import write_shards
    from data.sources import synthetic_examples

    write_shards(synthetic_examples(40, 0, 16), tmp_path / "shards")
    proc = subprocess.run([PY, "-m", "trainer.train",
                           "--config", "dpcap_own", f"data.shards={tmp_path / 'shards'}", "ds.train_batch_size=32",
                           "ds.train_micro_batch_size_per_gpu=16",
                           "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "N = 40" in proc.stderr


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_configs_and_meta_json_nested_too_deep_are_refused_clearly(tmp_path):
    from trainer.common.config import load_config
    from trainer.train import main

    deep = tmp_path / "deep.json"
    deep.write_text('{"model": {"overrides": {"x": ' + _nested(100_000) + "}}}")
    with pytest.raises(ValueError, match="nested more than 64 levels deep"):
        load_config(str(deep))
    shallow_but_deep = tmp_path / "deep2.json"  # parses, but would break the job later
    shallow_but_deep.write_text('{"model": {"overrides": {"x": ' + _nested(500) + "}}}")
    with pytest.raises(ValueError, match="nested more than 64 levels deep"):
        load_config(str(shallow_but_deep))
    with pytest.raises(ValueError, match="nested more than 64 levels deep"):
        load_config("default", ["model.overrides.x=" + _nested(100_000)])
    assert main(["--config", str(deep), "--dry-run"]) == 2
    step = tmp_path / "ckpt" / "step_00000001"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(_nested(100_000))
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        read_meta(step)


def test_init_from_a_private_checkpoint_reports_its_own_epsilon(tmp_path):
    from trainer.train import _summary_text

    first = tiny_config(tmp_path / "first", **{**NOISY, "privacy.secret_seed": 5})
    second = tiny_config(tmp_path / "second", **{**NOISY, "privacy.secret_seed": 5},
                         init=str(tmp_path / "first" / "ckpt"))
    out = run_jobs(1, tmp_path, [("first", first, []), ("second", second, [])], launcher="python")
    init = out["second"]["summary"]["init_privacy"]
    assert init["epsilon_rdp"] == out["first"]["summary"]["epsilon_rdp"] and init["delta"] == 1e-3
    text = _summary_text(out["second"]["summary"])
    assert f"epsilon = {init['epsilon_rdp']:.3f} (RDP)" in text.split("--init weights:")[1]
    assert "composes" in text


def test_skipped_samples_never_log_which_examples_a_step_drew(tmp_path, caplog):
    """A sample that cannot be read is counted and logged by reason, never by its index or key."""
    import data.decode
    from data.loader import PoissonReader
    from data.shards import write_shards
    from data.sources import synthetic_examples
    from data.tar_index import TarIndex
    from data.transform import ImageTextTransform

    write_shards(synthetic_examples(8, 0, 16), tmp_path / "shards")
    shard = next((tmp_path / "shards").glob("*.tar"))
    with tarfile.open(shard) as tar:  # the sixth sample's image
        image = [m for m in tar.getmembers() if m.name.endswith((".jpg", ".png", ".webp"))][5]
    raw = bytearray(shard.read_bytes())
    raw[image.offset_data:image.offset_data + 64] = bytes(64)  # undecodable now
    shard.write_bytes(bytes(raw))

    class AllOfThem:
        def step_batches(self, step):
            return [list(range(8))]  # every example, every step

    data.decode._SEEN_IN_PROCESS.clear()  # the first skip of a reason is the one logged
    reader = PoissonReader(TarIndex(tmp_path / "shards" / "index.json"), AllOfThem(),
                           ImageTextTransform(16, lambda text: [0] * 4, 4, None))
    with caplog.at_level(logging.WARNING):
        batches = list(reader.micro_batches(0))
    assert reader.skipped == 1 and batches[0].images.shape[0] == 7
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert re.search(r"skipping bad sample \(undecodable image\) \(a sampled example\);", logged), logged
    # a shard gone since it was indexed: every sample in it is skipped, none named
    caplog.clear()
    shard.unlink()
    reader = PoissonReader(TarIndex(tmp_path / "shards" / "index.json"), AllOfThem(),
                           ImageTextTransform(16, lambda text: [0] * 4, 4, None))
    with caplog.at_level(logging.WARNING):
        list(reader.micro_batches(0))
    assert reader.skipped == 8
    logged = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert logged and all(") (a sampled example);" in message for message in logged), logged
