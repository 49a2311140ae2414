"""trainer.probe: the logistic-regression probe, k-shot draws, the CLI on real checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from data import synthetic
from tests.helpers.checkpoints import save_like_trainer
from tests.helpers.cli import checkpoint_params, train_tiny_default
from tests.helpers.processes import REPO
from tests.helpers.standin import TINY_MODEL
from trainer import probe
from trainer.common import probing
from trainer.common.heldout import HeldOut
from trainer.common.config import JobConfig, ModelConfig, load_config
from trainer.common.weights import load_trained_model, locate

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- classifier

def test_probe_separates_gaussian_clusters_and_stays_at_chance_on_noise_labels():
    g = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(5, 12, generator=g)
    train_y, test_y = torch.randint(5, (200,), generator=g), torch.randint(5, (500,), generator=g)
    train_x = centres[train_y] + torch.randn(200, 12, generator=g)
    test_x = centres[test_y] + torch.randn(500, 12, generator=g)
    assert probing.probe_accuracy(train_x, train_y, test_x, test_y, 5) >= 0.98

    # more dimensions than a class has examples: the fit memorises the training labels,
    # which must not show in the test accuracy
    noise_x, noise_y = torch.randn(120, 40, generator=g), torch.randint(4, (120,), generator=g)
    assert probing.probe_accuracy(noise_x, noise_y, noise_x, noise_y, 4) > 0.6  # fits its train set
    test_x, test_y = torch.randn(2000, 40, generator=g), torch.randint(4, (2000,), generator=g)
    assert abs(probing.probe_accuracy(noise_x, noise_y, test_x, test_y, 4) - 0.25) < 0.05


def test_k_shot_draws_k_per_class_deterministically_and_differently_per_trial():
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 9)[torch.randperm(21, generator=torch.Generator().manual_seed(1))]
    classes = ["cat", "dog", "eel"]
    g = torch.Generator().manual_seed(3)
    trials = [probing.sample_shots(labels, 5, classes, g) for _ in range(4)]
    for pick in trials:
        assert len(set(pick.tolist())) == 15
        assert torch.bincount(labels[pick], minlength=3).tolist() == [5, 5, 5]
    again = torch.Generator().manual_seed(3)
    assert all(torch.equal(probing.sample_shots(labels, 5, classes, again), t) for t in trials)
    assert len({tuple(sorted(t.tolist())) for t in trials}) > 1

    with pytest.raises(ValueError, match="--shots 6: class 'dog' has only 5 training examples"):
        probing.sample_shots(labels, 6, classes, g)


class ObjectColour(nn.Module):
    """Stands in for an encoder whose features name the object's colour: the palette
    colour with the second most pixels (the background has the most)."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        from data import synthetic
        from data.transform import IMAGENET_MEAN, IMAGENET_STD

        rgb = (images * torch.tensor(IMAGENET_STD).view(3, 1, 1)
               + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) * 255
        palette = torch.tensor(list(synthetic.COLOURS.values()), dtype=torch.float32)
        counts = ((rgb[:, None] - palette.view(1, -1, 3, 1, 1)).abs() < 0.5).all(2).flatten(2).sum(2)
        object_colour = counts.float().topk(2).indices[:, 1]  # [B]
        onehot = nn.functional.one_hot(object_colour, len(palette)).float()
        return torch.stack([torch.zeros_like(onehot), onehot], dim=1)  # [B, cls + 1 token, 8]


def test_labels_stay_with_their_images_through_split_batches_and_shots():
    cfg = JobConfig(model=ModelConfig(overrides={"img_size": 32}))
    data = probing.synthetic_data(HeldOut.of(cfg), "colour", 160)
    r = probing.run_probe(ObjectColour(), data, shots=[1, 3], trials=3, pool="mean", batch_size=7,
                        device=CPU, l2=1e-3, seed=0)
    assert (r["train_examples"], r["test_examples"], r["classes"]) == (80, 80, 8)
    assert r["linear_probe"]["top1"] == 1.0
    assert r["few_shot"]["3"]["mean"] == 1.0
    # the CLS token of this stand-in is all zeros: nothing to learn beyond the majority class
    cls = probing.run_probe(ObjectColour(), data, shots=[], trials=1, pool="cls", batch_size=64,
                          device=CPU, l2=1e-3, seed=0)
    assert cls["linear_probe"]["top1"] < 0.3


# --------------------------------------------------------------------------- CLI

def _probe_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "trainer.probe", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dpcap_run(tmp_path_factory):
    """A one-step DP-Cap job of the real trainer: its checkpoint folder."""
    cwd = tmp_path_factory.mktemp("dpcap")
    train_tiny_default(cwd, "name=probe", "steps=1", "metrics.num_captions=0", "eval.zero_shot=false")
    return cwd / "runs/probe/checkpoints"


def _expected_probe(step, tmp_path, examples: int, shots, trials: int) -> dict:
    """The CLI's default probe (mean-pooled patch features of batches of 64, standardised by the
    train half, l2 1e-3, shots drawn from seed 0), computed here from the checkpoint's tensors
    read back by torch's DCP converter into a freshly built model and the held-out images; the
    classifier and the shot draws are the ones tested above."""
    from trainer.common.build import build_model, build_tokenizer

    (tmp_path / "job.json").write_text(json.dumps(json.loads((step / "meta.json").read_text())["config"]))
    cfg = load_config(str(tmp_path / "job.json"))
    model = build_model(cfg, build_tokenizer(cfg))
    model.load_state_dict(checkpoint_params(step, tmp_path))
    images, labels, _ = HeldOut.of(cfg).task("colour", examples)
    with torch.no_grad():
        features = torch.cat([model.eval().features(batch)[:, 1:].mean(1) for batch in images.split(64)])
    half = examples // 2
    train, test = features[:half], features[half:]
    mean, std = train.mean(0), train.std(0, correction=0).clamp_min(1e-6)
    train, test = (train - mean) / std, (test - mean) / std
    classes = len(synthetic.COLOURS)
    out = {"top1": probing.probe_accuracy(train, labels[:half], test, labels[half:], classes, 1e-3)}
    for k in shots:
        g = torch.Generator().manual_seed(0)
        picks = [probing.sample_shots(labels[:half], k, list(synthetic.COLOURS), g) for _ in range(trials)]
        out[str(k)] = [probing.probe_accuracy(train[p], labels[:half][p], test, labels[half:], classes, 1e-3)
                       for p in picks]
    return out


def test_cli_on_a_dpcap_checkpoint_and_the_same_weights_in_the_original_layout(dpcap_run, tmp_path, capsys):
    out = tmp_path / "results.json"
    proc = _probe_cli(str(dpcap_run), "--data", "synthetic:colour", "--examples", "160",
                      "--shots", "1,3", "--trials", "3", "--device", "cpu", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["model"] == "dpcap_nano" and r["classes"] == 8 and r["chance"] == 0.125
    assert (r["train_examples"], r["test_examples"]) == (80, 80)
    expected = _expected_probe(dpcap_run / "step_00000001", tmp_path, examples=160, shots=(1, 3), trials=3)
    assert r["linear_probe"]["top1"] == expected["top1"]
    assert set(r["few_shot"]) == {"1", "3"}
    for k, s in r["few_shot"].items():
        assert s["trials"] == expected[k]
        assert s["mean"] == pytest.approx(np.mean(s["trials"])) and s["std"] == pytest.approx(np.std(s["trials"]))
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("linear probe: top-1 ") and "(8 classes, chance 0.125, 80 train / 80 test)" in lines[0]
    assert lines[1].startswith("1-shot: ") and lines[1].endswith(" over 3 trials")

    # the same weights as an original-layout DP-Cap .pth, the model named by --config
    import models

    step = dpcap_run / "step_00000001"
    torch.save({"model": models.to_upstream_state_dict(checkpoint_params(step, tmp_path))}, tmp_path / "dpcap.pth")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(json.loads((step / "meta.json").read_text())["config"]))
    assert probe.main([str(tmp_path / "dpcap.pth"), "--config", str(config), "--examples", "160",
                       "--shots", "1,3", "--trials", "3", "--device", "cpu",
                       "--out", str(tmp_path / "upstream.json")]) == 0
    again = json.loads((tmp_path / "upstream.json").read_text())
    assert again["linear_probe"] == r["linear_probe"] and again["few_shot"] == r["few_shot"]


@pytest.mark.parametrize("args, message", [
    (["missing"], "missing: no such checkpoint folder or file"),
    (["CKPT", "--data", "synthetic:texture"], "unknown task"),
    (["CKPT", "--data", "EMPTY"], "expected class folders"),
    (["CKPT", "--examples", "40", "--shots", "9"], "training examples; use fewer shots"),
    (["WEIGHTS"], "--config"),
])
def test_cli_errors_are_one_line_and_exit_2(dpcap_run, tmp_path, capsys, args, message):
    (tmp_path / "EMPTY" / "train").mkdir(parents=True)
    (tmp_path / "w.pth").write_bytes(b"")
    paths = {"CKPT": str(dpcap_run), "EMPTY": str(tmp_path / "EMPTY"), "WEIGHTS": str(tmp_path / "w.pth"),
             "missing": str(tmp_path / "missing")}
    assert probe.main([paths.get(a, a) for a in args] + ["--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


@pytest.fixture(scope="module")
def vip_checkpoint(tmp_path_factory):
    """A tiny ViP saved as the trainer saves (DCP tensors, then meta.json with the config)."""
    from trainer.common.build import build_model

    cfg = load_config("vip_stage1", TINY_MODEL)
    torch.manual_seed(11)
    model = build_model(cfg, None)
    folder = tmp_path_factory.mktemp("vip") / "checkpoints"
    save_like_trainer(folder, cfg, model, step=5)
    return folder, model


def test_vip_checkpoint_loads_its_weights(vip_checkpoint):
    folder, saved = vip_checkpoint
    cfg, weights = locate(str(folder), None)
    assert weights.name == "step_00000005" and cfg.model.name == "vip_base"
    torch.manual_seed(12)  # a different initialisation, replaced by the checkpoint's
    model = load_trained_model(cfg, weights)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.features(images), saved.eval().features(images))


def _write_folder(root, colours: dict[str, tuple[int, int, int]], per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "notes.txt").write_text("not a class")
    (root / ".cache").mkdir()  # hidden: not a class


def test_vip_on_an_image_folder_separates_colours(vip_checkpoint, tmp_path):
    colours = {"blue": (40, 60, 200), "green": (40, 170, 60), "red": (210, 40, 40)}
    _write_folder(tmp_path / "images" / "train", colours, 6, seed=0)
    _write_folder(tmp_path / "images" / "val", colours, 5, seed=1)
    (tmp_path / "images" / "train" / "red" / "readme.md").write_text("ignored: not an image")
    out = tmp_path / "r.json"
    assert probe.main([str(vip_checkpoint[0]), "--data", str(tmp_path / "images"), "--pool", "cls",
                       "--shots", "2", "--trials", "2", "--device", "cpu", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["classes"], r["train_examples"], r["test_examples"]) == (3, 18, 15)
    # a random encoder still carries an image's overall colour
    assert r["linear_probe"]["top1"] == 1.0 and r["few_shot"]["2"]["mean"] > 0.8
