"""python -m trainer.export: a checkpoint's weights, without its secrets, in one file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.checkpoints import save_like_trainer
from tests.helpers.processes import REPO
from tests.helpers.standin import TINY_MODEL
from trainer import export
from trainer.common.build import build_model, build_tokenizer
from trainer.common.config import load_config
from trainer.common.weights import load_trained_model

SECRET_SEED = 987_654_321_123


def _save(folder, cfg, model):
    """A checkpoint as the trainer writes it: DCP tensors (with optimizer state), then a
    meta.json with the config and the secret seed."""
    optimizer = torch.optim.AdamW(model.parameters())
    loss = model(*_inputs()) if cfg.is_captioner else model(torch.randn(2, 3, 32, 32))
    loss.sum().backward()
    optimizer.step()
    save_like_trainer(folder, cfg, model, optimizer, engine={"seed": SECRET_SEED}, sampling_seed=SECRET_SEED)


def _inputs():
    tokens = torch.tensor([[101, 1037, 2417, 102, 0, 0], [101, 2665, 102, 0, 0, 0]])
    return torch.randn(2, 3, 32, 32), tokens


@pytest.fixture(scope="module")
def dpcap_checkpoint(tmp_path_factory):
    """A tiny DP-Cap with the full BERT vocabulary (a shards job), as trained and saved."""
    cfg = load_config("dpcap_nano_paper", [*TINY_MODEL, "data.text_length=6"])
    torch.manual_seed(0)
    model = build_model(cfg, build_tokenizer(cfg))
    folder = tmp_path_factory.mktemp("dpcap") / "checkpoints"
    _save(folder, cfg, model)
    return folder, model.eval(), cfg


def test_export_holds_the_weights_and_no_secret(dpcap_checkpoint, tmp_path):
    folder, trained, cfg = dpcap_checkpoint
    out = tmp_path / "release.pth"
    assert export.main([str(folder), str(out)]) == 0
    saved = torch.load(out, weights_only=True)
    assert list(saved) == ["model"]
    assert saved["model"].keys() == trained.state_dict().keys()
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(saved["model"][key], value, rtol=0, atol=0, msg=key)
    raw = out.read_bytes()
    assert str(SECRET_SEED).encode() not in raw and SECRET_SEED.to_bytes(8, "little") not in raw
    assert b"exp_avg" not in raw  # no optimizer state
    assert not list(tmp_path.glob(".*.tmp"))


def test_original_layout_loads_back_through_the_converter_and_init(dpcap_checkpoint, tmp_path):
    folder, trained, cfg = dpcap_checkpoint
    out = tmp_path / "original.pth"
    assert export.main([str(folder), str(out), "--layout", "original"]) == 0
    original = torch.load(out, weights_only=True)["model"]
    assert "decoder.layers.0.self_attn.bias" in original and "text_embedding_layer_SimVLM.weight" in original
    assert original["text_embedding_layer_SimVLM.weight"].shape[0] == 30_522
    # what --init and the probe do with such a file
    torch.manual_seed(1)
    model = load_trained_model(cfg, out)
    images, tokens = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(images, tokens), trained(images, tokens), rtol=0, atol=0)


def test_refusals(dpcap_checkpoint, tmp_path, capsys):
    folder, _, _ = dpcap_checkpoint
    out = tmp_path / "taken.pth"
    out.write_bytes(b"keep me")
    assert export.main([str(folder), str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert export.main([str(folder), str(out), "--force"]) == 0
    assert torch.load(out, weights_only=True)["model"]

    vip_cfg = load_config("vip_stage1", TINY_MODEL)
    vip = build_model(vip_cfg, None)
    vip_folder = tmp_path / "vip"
    _save(vip_folder, vip_cfg, vip)
    assert export.main([str(vip_folder), str(tmp_path / "vip.pth")]) == 0

    synthetic_cfg = load_config("default", TINY_MODEL)  # the compact synthetic-caption vocabulary
    with pytest.raises(ValueError, match="vocabulary has 149 ids"):
        export.exported_state_dict(build_model(synthetic_cfg, build_tokenizer(synthetic_cfg)), "original")
    assert export.main([str(tmp_path / "nothing"), str(tmp_path / "x.pth")]) == 2
    assert "no such checkpoint folder or file" in capsys.readouterr().err


def test_module_cli(dpcap_checkpoint, tmp_path):
    folder, _, _ = dpcap_checkpoint
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "trainer.export", str(folder), str(tmp_path / "w.pth")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote" in proc.stdout and "dpcap_nano" in proc.stdout and "weights only" in proc.stdout
    meta = json.loads((folder / "step_00000003" / "meta.json").read_text())
    assert meta["train_state"]["sampling_seed"] == SECRET_SEED  # the checkpoint keeps it; the export does not


def test_vip_in_the_original_mae_layout_loads_back(tmp_path):
    """ViP's original layout is MAE's (models_mae.MaskedAutoencoderViT with timm blocks):
    bare cls/mask tokens and position embeddings, everything else named as ours."""
    cfg = load_config("vip_stage1", TINY_MODEL)
    torch.manual_seed(0)
    vip = build_model(cfg, None).eval()
    save_like_trainer(tmp_path / "vip", cfg, vip)
    assert export.main([str(tmp_path / "vip"), str(tmp_path / "mae.pth"), "--layout", "original"]) == 0
    mae = torch.load(tmp_path / "mae.pth", weights_only=True)["model"]
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed.proj.weight",
                "patch_embed.proj.bias", "norm.weight", "norm.bias", "decoder_embed.weight",
                "decoder_embed.bias", "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight",
                "decoder_pred.bias", *(f"blocks.0.{k}" for k in block), *(f"decoder_blocks.0.{k}" for k in block)}
    assert set(mae) == expected
    assert mae["pos_embed"].shape == (1, 17, 32) and mae["mask_token"].shape == (1, 1, 32)
    torch.manual_seed(1)
    again = load_trained_model(cfg, tmp_path / "mae.pth")  # what --init does with a ViP-Syn file
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(images, noise=noise), vip(images, noise=noise), rtol=0, atol=0)


def test_safetensors_format_and_its_name(dpcap_checkpoint, tmp_path, capsys):
    """--format safetensors writes the weights with no pickle; the suffix must say which format a
    file is (the readers tell them apart by it)."""
    folder, trained, cfg = dpcap_checkpoint
    assert export.main([str(folder), str(tmp_path / "w.safetensors"), "--layout", "original"]) == 0
    from safetensors.torch import load_file

    original = load_file(tmp_path / "w.safetensors")
    assert original["text_embedding_layer_SimVLM.weight"].shape[0] == 30_522
    assert b"\x80\x04" not in (tmp_path / "w.safetensors").read_bytes()[:16]  # no pickle header
    model = load_trained_model(cfg, tmp_path / "w.safetensors")  # original layout, converted back
    images, tokens = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(images, tokens), trained(images, tokens), rtol=0, atol=0)
    assert export.main([str(folder), str(tmp_path / "w.pth"), "--format", "safetensors"]) == 2
    assert "name the file" in capsys.readouterr().err
    assert export.main([str(folder), str(tmp_path / "x.safetensors"), "--format", "pth"]) == 2
    assert "use --format safetensors" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_trained_model(cfg, tmp_path / "bad.safetensors")
