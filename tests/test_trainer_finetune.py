"""The classification job's parts, in one process: the class folder's checks, what each
``finetune.layers`` trains, the parameter average's release, and the privacy engine on a
classifier with grouped views (each example's K views add at most C, against torch.func)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.classifier import Classifier, add_average, averages, released_state_dict
from trainer.common.build import build_classifier
from trainer.common.config import load_config
from trainer.job.tasks import Classification
from trainer.job.validation import validate
from tests.helpers.classes import TINY, write_folder

def config(folder: Path, *overrides: str):
    return load_config("finetune_own", [f"data.classes={folder}", *TINY, *overrides])


# --------------------------------------------------------------------------- the folder's checks

def test_a_folder_of_one_class_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"1 class \(cat\); a classifier needs at least two"):
        Classification(config(write_folder(tmp_path, classes=("cat",))))


def test_a_class_without_training_images_is_named(tmp_path):
    folder = write_folder(tmp_path, split=True)
    for f in (folder / "train/dog").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=r"classes \['dog'\] have no readable training images"):
        Classification(config(folder))


def test_a_validation_class_absent_from_training_is_named(tmp_path):
    folder = write_folder(tmp_path, split=True)
    (folder / "val/emu").mkdir()
    (folder / "val/cat/cat_0.png").rename(folder / "val/emu/emu_0.png")
    with pytest.raises(ValueError, match=r"val classes \['emu'\] have no train folder"):
        Classification(config(folder))


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    folder = write_folder(tmp_path, split=True)
    (folder / "train/cat/broken.png").write_bytes(b"not a png at all")
    (folder / "train/dog/empty.jpg").write_bytes(b"")
    task = Classification(config(folder))
    assert len(task.train) == 3 * 5 and task.train.skipped.total == 2
    assert "skipped 2 unreadable training images" in caplog.text and "broken.png" in caplog.text
    assert task.reader(sampler=None).skipped == 2  # what the job's metrics report


def test_a_model_without_a_head_to_replace_is_refused(tmp_path):
    cfg = config(write_folder(tmp_path), "model.name=timm:resnet18", "model.overrides={}",
                 "model.overrides.num_classes=0", "model.num_classes=3")
    with pytest.raises(ValueError, match="has no linear head to replace"):
        build_classifier(cfg)


def test_finetune_settings_are_checked_before_any_work(tmp_path):
    folder = write_folder(tmp_path)
    for bad, message in (("finetune.layers=some", "finetune.layers must be head, all or last:K"),
                         ("finetune.layers=last:0", "finetune.layers must be"),
                         ("finetune.views=0", "finetune.views must be >= 1"),
                         ("finetune.ema=1.0", r"finetune.ema must be in \[0, 1\)"),
                         ("finetune.crop=0", r"finetune.crop \(the smallest crop's share of the area\)")):
        with pytest.raises(ValueError, match=message):
            validate(config(folder, bad), 1, False)
    with pytest.raises(ValueError, match="needs data.classes=FOLDER"):
        Classification(load_config("finetune_own", TINY))
    with pytest.raises(ValueError, match="data.classes is for a classification job"):
        validate(load_config("default", [f"data.classes={folder}"]), 1, False)


def test_a_flat_folder_is_split_by_file_name_hash_as_eval_data_is(tmp_path):
    task = Classification(config(write_folder(tmp_path, per_class=10), "eval.val_fraction=0.2"))
    assert task.classes == ["cat", "dog", "owl"] and len(task.val_labels) == 6 and len(task.train) == 24
    assert task.cfg.model.num_classes == 3


# --------------------------------------------------------------------------- what trains

def _classifier(cfg):
    model = build_classifier(cfg)
    return model, {n for n, p in model.named_parameters() if p.requires_grad}


def test_finetune_layers_choose_the_trainable_parameters(tmp_path):
    folder = write_folder(tmp_path)
    for name in ("dpcap_nano", "vip_base"):
        base = config(folder, f"model.name={name}", "model.num_classes=3")
        model, head = _classifier(base)
        assert head == {"head.weight", "head.bias"}
        assert not hasattr(model.encoder, "decoder_blocks")  # the caption/pixel decoder is dropped
        _, last = _classifier(config(folder, f"model.name={name}", "model.num_classes=3", "finetune.layers=last:1"))
        assert any(n.startswith("encoder.blocks.1.") for n in last)
        assert not any(n.startswith(("encoder.blocks.0.", "encoder.patch_embed")) for n in last)
        assert "encoder.norm.weight" in last and head < last
        model, every = _classifier(config(folder, f"model.name={name}", "model.num_classes=3", "finetune.layers=all"))
        assert every == {n for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match=r"K must be in \[1, 2\]"):
        _classifier(config(folder, "model.num_classes=3", "finetune.layers=last:3"))


def test_the_engine_clips_only_what_trains(tmp_path):
    from privacy import PrivacyEngine

    model, head = _classifier(config(write_folder(tmp_path), "model.num_classes=3"))
    engine = PrivacyEngine(model, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=4)
    assert set(engine.covered_parameters) == head


def test_the_release_holds_the_average_in_the_parameters_places(tmp_path):
    model = Classifier(__import__("models").create_model("dpcap_nano", **{k.split(".")[-1]: int(v) for k, v in
                                                                           (o.split("=") for o in TINY)}), 3)
    add_average(model)
    assert released_state_dict(model).keys() == {k for k in model.state_dict() if not k.startswith("average")}
    for p, average in averages(model).values():
        average.add_(1.0)  # an average that differs from the parameters
    assert torch.equal(released_state_dict(model)["head.bias"], model.head.bias.detach())  # no update yet
    model.average_steps.add_(1)
    assert torch.equal(released_state_dict(model)["head.bias"], model.head.bias.detach() + 1)


# --------------------------------------------------------------------------- grouped views

def test_each_example_adds_at_most_c_of_its_views_mean_gradient(tmp_path):
    """engine.backward(loss, views=K) with noise 0: the step's gradient is the sum over examples of
    their K views' mean gradient clipped to C (torch.func's), so each example adds at most C."""
    from torch.func import functional_call, grad, vmap

    from privacy import PrivacyEngine

    torch.manual_seed(0)
    cfg = config(write_folder(tmp_path, split=True), "finetune.layers=all", "finetune.views=3")
    task = Classification(cfg)
    model = build_classifier(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a head away from zero, so every layer has a gradient
    reference = copy.deepcopy(model)
    sampler = type("Fixed", (), {"step_batches": lambda self, step: [[0, 4, 9, 13]]})()
    images, labels = next(task.reader(sampler).micro_batches(0))
    K, C, b = 3, 0.05, len(labels)
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in reference.named_parameters()}

    def example_loss(trainable, views, label):
        logits = functional_call(reference, {**params, **trainable}, (views,))
        return torch.nn.functional.cross_entropy(logits, label.expand(K))  # the mean over its K views

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(
        {n: params[n] for n in names}, images.view(b, K, *images.shape[1:]), labels)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_example.values()))
    factors = (C / norms).clamp(max=1.0)
    assert (factors < 1).all()  # every example clipped: the bound binds
    expected = {n: (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0) for n, g in per_example.items()}

    engine = PrivacyEngine(model, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=1.0)
    task.private_backward(engine, task.loss(model, (images, labels)))
    engine.finish_step()
    got = dict(model.named_parameters())
    for n in names:
        torch.testing.assert_close(got[n].grad, expected[n], rtol=1e-4, atol=1e-7)
    total = torch.sqrt(sum(got[n].grad.square().sum() for n in names))
    assert total <= b * C * (1 + 1e-5)


# --------------------------------------------------------------------------- the zero-shot prompt hint

def test_a_prompt_that_never_precedes_a_class_name_gets_the_captions_own_text():
    from trainer.common.evaluation import prompt_hint

    captions = ["a blurry photo of a golden retriever.", "a blurry photo of a cat", "two cats on a sofa",
                "a close photo of a cat"]
    hint = prompt_hint("this is a photo of a", ["golden_retriever", "cat"], captions)
    assert "never comes before a class name in 4 training captions sampled (3 name a class)" in hint
    assert hint.endswith('try eval.prompt="a blurry photo of a"')
    assert prompt_hint("photo of a", ["golden_retriever", "cat"], captions) is None  # met once: no warning
    assert prompt_hint("this is a photo of a", ["owl"], captions) is None  # no caption names a class


def test_the_hint_reads_a_sample_of_the_captions_of_your_shards(tmp_path):
    from data.shards import ShardLimits, write_shards
    from data.sources import Example
    from trainer.common.evaluation import prompt_hint
    from trainer.job.training_data import prepare_shards, sample_captions

    names = ["cat", "dog"] * 10
    write_shards((Example(Image.new("RGB", (8, 8)), f"a grainy snapshot of a {n}") for n in names), tmp_path / "s",
                 ShardLimits(max_count=7))
    cfg = load_config("dpcap_own", [f"data.shards={tmp_path / 's'}", "data.num_examples=20"])
    captions = sample_captions(cfg, prepare_shards(cfg, None), count=5)
    assert captions == [f"a grainy snapshot of a {n}" for n in names[::4]]
    assert prompt_hint(cfg.eval.prompt, ["cat", "dog"], captions).endswith('eval.prompt="a grainy snapshot of a"')


def test_the_job_samples_its_training_captions_for_the_hint():
    from data import synthetic
    from trainer.job.training_data import sample_captions

    cfg = load_config("default", ["data.num_examples=1000"])
    captions = sample_captions(cfg, None, count=10)
    assert captions == [synthetic.make_scene(cfg.data.seed, i).caption for i in range(0, 1000, 100)]


def test_the_dry_run_plans_on_the_folders_training_images(tmp_path, capsys):
    from trainer.train import main

    folder = write_folder(tmp_path / "images", per_class=8)
    (folder / "cat/broken.png").write_bytes(b"\x89PNG but not")
    assert main(["--config", "finetune_own", f"data.classes={folder}", *TINY, "ds.train_batch_size=8",
                 "privacy.target_epsilon=4", "--dry-run"]) == 0
    assert "data: N = 18 examples (classes)" in capsys.readouterr().out  # 3 x 6 readable, the broken one left out


def test_a_timm_model_gets_a_new_head_its_weights_from_a_local_file_and_exports_as_timm_loads_it(tmp_path):
    import timm

    from privacy import PrivacyEngine
    from trainer.export import exported_state_dict
    from trainer.job.tasks import load_encoder

    arch = dict(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2)
    pretrained = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, **arch)
    torch.save(pretrained.state_dict(), tmp_path / "vit.pth")  # a local file: nothing is downloaded
    cfg = config(write_folder(tmp_path / "images"), "model.name=timm:vit_tiny_patch16_224", "model.overrides={}",
                 *[f"model.overrides.{k}={v}" for k, v in arch.items()], "model.num_classes=3",
                 "finetune.layers=last:1", "finetune.ema=0.9")
    model = build_classifier(cfg)
    load_encoder(model, str(tmp_path / "vit.pth"))
    assert torch.equal(model.blocks[0].attn.qkv.weight, pretrained.blocks[0].attn.qkv.weight)
    assert model.head.weight.shape == (3, 16)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "blocks.1.mlp.fc1.weight" in trainable and "head.weight" in trainable
    assert not any(n.startswith(("blocks.0.", "patch_embed", "cls_token")) for n in trainable)
    engine = PrivacyEngine(model, max_grad_norm=1.0, noise_multiplier=0.0, expected_batch_size=2)
    assert set(engine.covered_parameters) == trainable
    # the export holds timm's keys (no average buffers): timm loads it into a fresh model of 3 classes
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **arch)
    fresh.load_state_dict(exported_state_dict(model, "ours"))
    with pytest.raises(ValueError, match="a timm model's --init is a weights file"):
        load_encoder(model, str(tmp_path))


def test_the_encoder_tools_refuse_a_fine_tuned_classifier(tmp_path):
    from trainer.common.weights import refuse_classifier

    with pytest.raises(ValueError, match="fine-tuned classifier .* trainer.export releases it"):
        refuse_classifier(config(write_folder(tmp_path)), "runs/x/checkpoints")
    refuse_classifier(load_config("default"), "runs/default/checkpoints")  # an encoder's job passes


def test_the_reader_gives_each_example_its_views_in_consecutive_rows(tmp_path):
    """The engine takes rows i K .. i K + K - 1 as example i's views (it is told, not shown):
    the reader must lay them out so, beside one label per example."""
    task = Classification(config(write_folder(tmp_path, split=True), "finetune.views=3", "finetune.augment=false"))
    picked = [0, 4, 9]
    sampler = type("Fixed", (), {"step_batches": lambda self, step: [picked]})()
    images, labels = next(task.reader(sampler).micro_batches(0))
    assert labels.tolist() == [task.train.labels[i] for i in picked] and images.shape[0] == 3 * len(picked)
    for row in range(images.shape[0]):
        i = picked[row // 3]
        assert torch.equal(images[row], task.to_pixels(task.train.images[i], "", (0, i, 0))[0]), row
