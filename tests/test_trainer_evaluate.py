"""python -m trainer.evaluate: its results are the model's own answers on the folder's images;
safetensors weights in and out; the one-folder split; refusals before the long part."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.checkpoints import save_like_trainer
from tests.helpers.photos import write_class_folder
from tests.helpers.standin import TINY_MODEL
from trainer import evaluate, export
from trainer.common.build import build_model, build_tokenizer
from trainer.common.config import load_config
from trainer.common.evaluation import label_text, summary_lines
from trainer.common.inputs import image_file_pixels, transform
from trainer.common.probing import folder_data, run_probe
from trainer.common.weights import load_trained_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dpcap(tmp_path_factory):
    """A tiny DP-Cap with the full BERT vocabulary (a shards job's), its checkpoint folder, the
    config as a file, and a class folder."""
    tmp = tmp_path_factory.mktemp("evaluate")
    cfg = load_config("dpcap_own", [*TINY_MODEL, "data.text_length=16"])
    torch.manual_seed(0)
    model = build_model(cfg, build_tokenizer(cfg)).eval()
    save_like_trainer(tmp / "checkpoints", cfg, model, step=7)
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict()))
    write_class_folder(tmp / "classes", per_class=5)
    return tmp, cfg, model


def test_results_are_the_models_own_answers_and_safetensors_round_trip(dpcap):
    tmp, cfg, model = dpcap
    out = tmp / "w.safetensors"
    assert export.main([str(tmp / "checkpoints"), str(out), "--format", "safetensors"]) == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"model": "dpcap_nano", "layout": "ours"}
        assert set(f.keys()) == set(model.state_dict())
    assert evaluate.main([str(out), "--config", str(tmp / "config.json"), "--data", str(tmp / "classes"),
                          "--shots", "1,2", "--trials", "3", "--captions", "3", "--device", "cpu",
                          "--out", str(tmp / "r.json")]) == 0
    r = json.loads((tmp / "r.json").read_text())
    assert r["model"] == "dpcap_nano" and r["checkpoint"] == str(out) and r["step"] is None

    # the reference: the model's own zero-shot choices and captions on the val images
    data = folder_data(tmp / "classes", cfg)
    test_files = [tmp / "classes" / name for name in data.test_names]
    pixels = torch.stack([image_file_pixels(f, transform(cfg, None)) for f in test_files])
    labels = [label_text(c) for c in data.classes]
    assert labels == ["blue square", "green square", "red square"]
    tokenizer = build_tokenizer(cfg)
    own = r["eval_data"]
    for method in ("trie", "loss"):
        picks = model.zero_shot(pixels, labels, method=method, tokenizer=tokenizer, prompt="this is a photo of a")
        assert own["zero_shot"][method]["accuracy"] == pytest.approx((picks == data.test_labels).float().mean().item())
    firsts = [data.test_labels.tolist().index(c) for c in range(3)]  # one image of each class
    expected = [tokenizer.decode(row.tolist()) for row in model.generate(pixels[firsts])]
    assert [c["caption"] for c in r["captions"]] == expected
    assert [c["image"] for c in r["captions"]] == [data.test_names[i] for i in firsts]
    probes = run_probe(model, data, shots=[1, 2], trials=3, pool="mean", batch_size=64, device=CPU, l2=1e-3, seed=0)
    assert own["linear_probe"] == probes["linear_probe"] and own["few_shot"] == probes["few_shot"]
    # what --init, probe and caption read: the same weights
    again = load_trained_model(cfg, out)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_a_vip_gets_probes_only(tmp_path):
    cfg = load_config("vip_own", ["model.overrides.depth=1", "model.overrides.embed_dim=32",
                                  "model.overrides.num_heads=2"])
    save_like_trainer(tmp_path / "vip", cfg, build_model(cfg, None), step=4)
    write_class_folder(tmp_path / "classes", per_class=4)
    assert evaluate.main([str(tmp_path / "vip"), "--data", str(tmp_path / "classes"), "--shots", "1",
                          "--device", "cpu", "--out", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["step"] == 4 and "zero_shot" not in r["eval_data"] and "captions" not in r
    assert set(r["eval_data"]["few_shot"]) == {"1"} and 0 <= r["eval_data"]["linear_probe"]["top1"] <= 1


def test_refusals_come_before_the_model_is_loaded(dpcap, tmp_path, capsys, caplog):
    tmp, _, _ = dpcap
    synthetic = load_config("default", TINY_MODEL)  # the compact vocabulary of the synthetic scenes
    save_like_trainer(tmp_path / "synthetic", synthetic, build_model(synthetic, build_tokenizer(synthetic)))
    cases = [
        ([str(tmp / "checkpoints"), "--shots", "4"], "4-shot probe skipped: --shots 4: class 'blue_square' "
                                                      "has only 3 training examples"),
        ([str(tmp_path / "synthetic"), "--shots", "1", "--prompt", "a photograph of a"],
         "zero-shot on eval.data skipped: 'a photograph of a' has a word outside the compact vocabulary"),
        ([str(tmp / "checkpoints"), "--methods", "trie,beam"], "['beam'] are not zero-shot methods"),
        ([str(tmp / "checkpoints"), "--data", str(tmp_path / "none")], "no such folder"),
    ]
    for args, message in cases:
        data = [] if "--data" in args else ["--data", str(tmp / "classes")]
        assert evaluate.main([*args, *data, "--device", "cpu", "--out", str(tmp_path / "r.json")]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and message in err, (args, err)
    assert not (tmp_path / "r.json").exists()
    # the defaults that cannot run are skipped with a warning, as in the job
    assert evaluate.main([str(tmp / "checkpoints"), "--data", str(tmp / "classes"), "--device", "cpu",
                          "--out", str(tmp_path / "r.json")]) == 0
    assert set(json.loads((tmp_path / "r.json").read_text())["eval_data"]["few_shot"]) == {"1"}
    assert "5-shot probe skipped: --shots 5" in caplog.text


def test_one_folder_is_split_by_file_name_hash(tmp_path):
    cfg = load_config("dpcap_own", TINY_MODEL)
    write_class_folder(tmp_path / "c", per_class=10)
    data = folder_data(tmp_path / "c", cfg, val_fraction=0.3)
    assert torch.bincount(data.test_labels).tolist() == [3, 3, 3]
    assert torch.bincount(data.train_labels).tolist() == [7, 7, 7]
    val = set(data.test_names)
    (tmp_path / "c" / "red_square" / "img_999.jpg").write_bytes((tmp_path / "c" / "red_square" / "img_000.jpg")
                                                                .read_bytes())
    grown = folder_data(tmp_path / "c", cfg, val_fraction=0.3)
    moved = val ^ set(grown.test_names)
    assert moved <= {"red_square/img_999.jpg"} | {n for n in val if n.startswith("red_square/")}
    assert {n for n in val if not n.startswith("red_square/")} <= set(grown.test_names)  # other classes kept
    assert folder_data(tmp_path / "c", cfg, max_per_class=2).test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    (tmp_path / "one" / "lonely").mkdir(parents=True)
    (tmp_path / "one" / "lonely" / "a.jpg").write_bytes((tmp_path / "c" / "red_square" / "img_000.jpg").read_bytes())
    with pytest.raises(ValueError, match="each class needs 2 images"):
        folder_data(tmp_path / "one", cfg)


def test_summary_lines_say_every_part_of_an_evaluation():
    """Held-out zero-shot and probes, then eval.data's zero-shot, probe and k-shot lines, in
    that order (the job's summary and python -m trainer.evaluate print these)."""
    results = {
        "zero_shot": {"colour": {"accuracy": 0.5, "classes": 8}}, "eval_examples": 300,
        "probe": {"shape": {"accuracy": 0.25, "classes": 6, "train": 150, "test": 150}},
        "eval_data": {"data": "classes/", "classes": 3, "chance": 1 / 3, "train_examples": 15,
                      "test_examples": 15, "zero_shot": {"trie": {"accuracy": 0.6}, "loss": {"accuracy": 0.4}},
                      "linear_probe": {"top1": 0.8667},
                      "few_shot": {"1": {"mean": 0.547, "std": 0.195, "trials": [0.5] * 5}}},
    }
    where = "3 classes, chance 0.333; 15 train / 15 test images of classes/"
    assert summary_lines(results) == [
        "zero-shot colour: accuracy 0.500 (8 classes, chance 0.125; 300 held-out images)",
        "linear probe shape: top-1 0.250 (6 classes, chance 0.167; 150 train / 150 test held-out images)",
        f"zero-shot on your classes: accuracy 0.600 (trie), 0.400 (loss) ({where})",
        f"linear probe on your classes: top-1 0.867 ({where})",
        "  1-shot: 0.547 +- 0.195 over 5 trials",
    ]
