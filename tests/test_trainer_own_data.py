"""Your own data, end to end: LAION-style shards written by webdataset.ShardWriter, named by a
brace pattern, indexed by two ranks at once, N taken from the index; the end-of-job evaluation
on a folder of your classes (zero-shot by trie and loss, probes, captions), its JSON file; the
dry run on such shards, quiet."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers.photos import COLOURS, SHAPES, photo, write_class_folder
from tests.helpers.processes import PY, REPO, free_port
from tests.helpers.samples import encoded
from tests.helpers.shards import write_like_img2dataset
from tests.helpers.standin import TINY_MODEL

# what a third-party warning flood looks like in our output
NOISE = ("absl", "failed to converge", "FutureWarning", "UserWarning", "Setting accelerator to CPU",
         "No CUDA runtime", "built successfully")


def captioned_examples(count: int, seed: int = 0):
    """(image, caption) pairs: "a photo of a red circle" and the like."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        yield photo(colour, shape, seed * 100_000 + i), f"a photo of a {colour} {shape}"


def write_shard_writer_shards(folder: Path, count: int, per_shard: int) -> None:
    """How img2dataset writes LAION, the pictures captioned "a photo of a red circle" and the like."""
    write_like_img2dataset(folder, ((encoded(image, "JPEG", quality=90), text, {"key": f"{i:09d}", "status": "success"})
                                    for i, (image, text) in enumerate(captioned_examples(count))), per_shard)


def test_laion_style_shards_on_two_ranks_then_evaluation_on_your_classes(tmp_path):
    write_shard_writer_shards(tmp_path / "laion", 96, per_shard=40)  # 00000..00002
    write_class_folder(tmp_path / "classes", per_class=6)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["--config", "dpcap_own", "data.shards=laion/{00000..00002}.tar", "eval.data=classes", *TINY_MODEL,
            "steps=2", "ds.train_batch_size=32", "ds.train_micro_batch_size_per_gpu=16", "optim.warmup_steps=1",
            "data.num_workers=1", "eval.shots=[1,5]", "eval.trials=2", "metrics.num_captions=2",
            "checkpoint.every_steps=0", "metrics.progress=false"]
    proc = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "trainer.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out, err = proc.stdout, proc.stderr
    # indexed once, by both ranks, beside the shards; N from the index
    assert "indexing 3 shards of data.shards=laion/{00000..00002}.tar, once" in err and "on 2 ranks x 1 process" in err
    assert "indexed 3 shards (96 samples) in " in err
    assert "data.num_examples not set: N = 96, the number of samples the index of data.shards lists" in err
    assert len(list((tmp_path / "laion").glob("index-*.json"))) == 1
    assert len(list((tmp_path / "laion").glob("index-*.offsets"))) == 1
    # the evaluation is on your classes, not the synthetic scenes
    assert "zero-shot colour" not in out and "linear probe colour" not in out
    assert "zero-shot on your classes: accuracy " in out and "(trie), " in out and "(loss)" in out
    assert "(3 classes, chance 0.333; 9 train / 9 test images of classes)" in out
    assert "1-shot: " in out and "5-shot" not in out
    assert "5-shot probe skipped: eval.shots 5: class 'blue_square' has only 3 training examples" in err
    results_file = tmp_path / "runs/dpcap_own/tb/eval_step_00000002.json"
    assert "evaluation results: runs/dpcap_own/tb/eval_step_00000002.json" in out
    r = json.loads(results_file.read_text())
    own = r["eval_data"]
    assert r["step"] == 2 and r["model"] == "dpcap_nano" and r["train_data"] == "laion/{00000..00002}.tar"
    assert own["classes"] == 3 and (own["train_examples"], own["test_examples"]) == (9, 9)
    assert own["zero_shot"]["labels"] == ["blue square", "green square", "red square"]
    assert own["zero_shot"]["prompt"] == "this is a photo of a"
    assert {"trie", "loss"} <= set(own["zero_shot"]) and set(own["few_shot"]) == {"1"}
    assert [c["true"] for c in r["captions"]] == ["blue square", "green square"]
    assert all(c["image"].startswith(("blue_square/", "green_square/")) for c in r["captions"])
    events = EventAccumulator(str(tmp_path / "runs/dpcap_own/tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert {"eval/data_zero_shot_trie", "eval/data_zero_shot_loss", "eval/data_linear_probe",
            "eval/data_1_shot"} <= set(events.Tags()["scalars"])
    assert "captions/text_summary" in events.Tags()["tensors"]
    assert not [line for line in err.splitlines() if any(n in line for n in NOISE)]

    # the tool on the job's checkpoint writes the same results (one process, not two ranks)
    tool = subprocess.run([PY, "-m", "trainer.evaluate", "runs/dpcap_own/checkpoints", "--data", "classes",
                           "--shots", "1", "--trials", "2", "--captions", "2", "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert tool.returncode == 0, tool.stderr[-3000:]
    again = json.loads((tmp_path / "eval_step_00000002.json").read_text())
    assert again["eval_data"]["zero_shot"] == own["zero_shot"] and again["captions"] == r["captions"]
    assert again["eval_data"]["linear_probe"] == own["linear_probe"]
    assert "evaluation results: eval_step_00000002.json" in tool.stdout
    assert not [line for line in tool.stderr.splitlines() if any(n in line for n in NOISE)]


def test_the_dry_run_indexes_counts_and_warns_of_a_weak_delta_quietly(tmp_path):
    """ViP on images alone; N left out, so the dry run indexes the shards (one process);
    q = 32/96 makes dp-accounting log screens of absl warnings, which must not show; a
    DeepSpeed backend, whose CPU warnings must not show either."""
    folder = tmp_path / "pictures"
    write_shard_writer_shards(folder, 96, per_shard=50)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([PY, "-m", "trainer.train", "--config", "vip_own", f"data.shards={folder}",
                           "ds.train_batch_size=32", "ds.train_micro_batch_size_per_gpu=16", "steps=50",
                           "backend=deepspeed", "ds.zero_optimization.stage=2", "--dry-run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: N = 96 examples (shards)" in proc.stdout
    assert "indexed 2 shards (96 samples)" in proc.stderr and (folder / "index.json").is_file()
    note = next(line for line in proc.stdout.splitlines() if "note: delta = 1/N" in line)
    assert "is weak for N = 96" in note and "privacy.delta=0.001:" in note
    from privacy import accounting
    from trainer.common.config import load_config
    from trainer.job.privacy_plan import resolve
    from trainer.job.validation import validate

    cfg = load_config("vip_own", ["data.num_examples=96", "ds.train_batch_size=32",
                                  "ds.train_micro_batch_size_per_gpu=16", "steps=50"])
    plan = resolve(cfg, validate(cfg, 1, False))
    expected = accounting.epsilon(plan.sigma, 32 / 96, 50, 1e-3, "rdp")
    assert f"epsilon {expected:.4g} (RDP)" in note
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if any(n in line for n in NOISE)]
    assert not noise, noise[:5]
