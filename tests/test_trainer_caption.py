"""python -m trainer.caption: captions and zero-shot labels of image files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.checkpoints import save_like_trainer
from tests.helpers.standin import TINY_MODEL
from trainer import caption
from trainer.common.build import build_model, build_tokenizer
from trainer.common.config import load_config

LABELS = ["red square", "green circle", "blue triangle"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as DP-Cap normalises


def pixels_of(path, size: int) -> torch.Tensor:
    """What the model should see of an image file, computed here (not with the CLI's code):
    RGB, bicubic resize of the whole image to size x size, ImageNet normalisation."""
    image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    rgb = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return (rgb - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny synthetic-caption DP-Cap (compact vocabulary) saved as the trainer saves it,
    and a few image files."""
    tmp = tmp_path_factory.mktemp("caption")
    cfg = load_config("default", TINY_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg, build_tokenizer(cfg)).eval()
    save_like_trainer(tmp / "checkpoints", cfg, model)
    rng = np.random.default_rng(0)
    files = []
    for i in range(5):
        files.append(tmp / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(files[-1])
    pixels = torch.stack([pixels_of(f, cfg.model.overrides["img_size"]) for f in files])
    return tmp / "checkpoints", model, cfg, files, pixels


def test_captions_are_the_models_greedy_captions(run, capsys):
    folder, model, cfg, files, pixels = run
    assert caption.main([str(folder), *map(str, files), "--batch-size", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    tokenizer = build_tokenizer(cfg)
    expected = [tokenizer.decode(row.tolist()) for row in model.generate(pixels)]
    assert lines == [f"{f}\t{text}" for f, text in zip(files, expected)]


@pytest.mark.parametrize("method", ["trie", "loss"])
def test_zero_shot_labels_are_the_models_choices(run, capsys, method):
    folder, model, cfg, files, pixels = run
    assert caption.main([str(folder), *map(str, files), "--labels", ",".join(LABELS), "--method", method,
                         "--prompt", "a", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    picks = model.zero_shot(pixels, LABELS, method=method, tokenizer=build_tokenizer(cfg), prompt="a")
    assert lines == [f"{f}\t{LABELS[i]}" for f, i in zip(files, picks.tolist())]


def test_errors_are_one_line_and_exit_2(run, tmp_path, capsys):
    folder, _, _, files, _ = run
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        ([str(folder), str(tmp_path / "missing.png")], "cannot read it"),
        ([str(folder), str(tmp_path / "notes.png")], "notes.png"),
        ([str(folder), str(files[0]), "--labels", "zebra"], "outside the compact vocabulary"),
        ([str(folder), str(files[0]), "--labels", " , "], "no class names"),
    ]
    vip_cfg = load_config("vip_stage1", TINY_MODEL)
    save_like_trainer(tmp_path / "vip", vip_cfg, build_model(vip_cfg, None))
    cases.append(([str(tmp_path / "vip"), str(files[0])], "not a DP-Cap"))
    for args, message in cases:
        assert caption.main(args + ["--device", "cpu"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], (args, err)
