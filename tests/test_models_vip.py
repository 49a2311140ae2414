"""ViP's masked autoencoder: size, MAE semantics, per-example losses, errors.

The reference is facebookresearch/mae's forward built from timm's modules (the
ones MAE itself uses), holding the model's weights, and MAE's numpy sin-cos
position embedding written out here: nothing of models/ computes it."""

from functools import partial

import numpy as np
import pytest
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

import models


def _tiny(**kw):
    torch.manual_seed(0)
    return models.create_model(
        "vip_base", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2, **kw,
    )


def _tiny_moved(**kw):
    """_tiny with every parameter moved off its initial value, as after training:
    freshly initialised LayerNorms are all alike (weight 1, bias 0), so using
    one in place of another would not show."""
    model = _tiny(**kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_vip_base_size_all_trainable():
    with torch.device("meta"):
        model = models.create_model("vip_base")
    assert all(p.requires_grad for p in model.parameters())
    assert abs(sum(p.numel() for p in model.parameters()) - 99.3e6) < 0.05e6
    assert len(model.blocks) == 12 and len(model.decoder_blocks) == 4
    assert model.blocks[0].attn.qkv.bias is not None
    assert not list(model.buffers())


def _mae_sincos_2d(dim: int, grid_size: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed(dim, grid_size, cls_token=True) (util/pos_embed.py), in numpy."""

    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))  # w first
    emb = np.concatenate([one_axis(dim // 2, grid[0]), one_axis(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)[None]


def test_position_embeddings_start_from_mae_sincos():
    model = _tiny()
    for weight, dim in ((model.pos_embed.weight, 32), (model.decoder_pos_embed.weight, 16)):
        expected = torch.from_numpy(_mae_sincos_2d(dim, 4)).float()
        torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=1e-6)  # fp32 of the same float64 values


def _mae_modules(model) -> nn.ModuleDict:
    """MAE's modules (timm's PatchEmbed and Block, LayerNorm eps 1e-6, as in models_mae.py)
    loaded strictly with the model's weights."""
    c = model.config
    norm = partial(nn.LayerNorm, eps=1e-6)
    mae = nn.ModuleDict({
        "patch_embed": PatchEmbed(c.img_size, c.patch_size, 3, c.embed_dim),
        "blocks": nn.ModuleList([Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=True, norm_layer=norm)
                                 for _ in range(c.depth)]),
        "norm": norm(c.embed_dim),
        "decoder_embed": nn.Linear(c.embed_dim, c.decoder_embed_dim),
        "decoder_blocks": nn.ModuleList([
            Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(c.decoder_depth)]),
        "decoder_norm": norm(c.decoder_embed_dim),
        "decoder_pred": nn.Linear(c.decoder_embed_dim, c.patch_size ** 2 * 3),
    })
    mae.load_state_dict({k: v for k, v in model.state_dict().items() if k.split(".")[0] in mae}, strict=True)
    return mae


def _mae_patchify(images, p):
    """MAE's patchify: [N, 3, H, W] -> [N, L, p*p*3]."""
    h = w = images.shape[2] // p
    x = images.reshape(images.shape[0], 3, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(images.shape[0], h * w, p * p * 3)


def _mae_reference(model, images, noise, mask_ratio, norm_pix_loss=True):
    """facebookresearch/mae's forward (random_masking with given noise, mask tokens
    appended then unshuffled, norm_pix_loss optional), batch-mean replaced by per
    example; on MAE's modules, with the model's weights."""
    mae = _mae_modules(model)
    x = mae.patch_embed(images) + model.pos_embed.weight[:, 1:]
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(N, L)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = model.cls_token.weight + model.pos_embed.weight[:, :1]
    x = torch.cat([cls.expand(N, -1, -1), x], dim=1)
    for blk in mae.blocks:
        x = blk(x)
    x = mae.decoder_embed(mae.norm(x))
    mask_tokens = model.mask_token.weight.repeat(N, L + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1) + model.decoder_pos_embed.weight
    for blk in mae.decoder_blocks:
        x = blk(x)
    pred = mae.decoder_pred(mae.decoder_norm(x))[:, 1:]
    target = _mae_patchify(images, model.config.patch_size)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_matches_mae_reference(mask_ratio):
    model = _tiny_moved()
    images, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    with torch.no_grad():
        loss = model(images, mask_ratio, noise=noise)
        torch.testing.assert_close(loss, _mae_reference(model, images, noise, mask_ratio))
        alone = torch.cat([model(images[i : i + 1], mask_ratio, noise=noise[i : i + 1]) for i in range(3)])
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, alone)  # per example: no mixing across the batch


def test_features_match_mae_encoder_on_every_patch():
    model = _tiny_moved()
    images = torch.randn(2, 3, 32, 32)
    mae = _mae_modules(model)
    x = mae.patch_embed(images) + model.pos_embed.weight[:, 1:]
    x = torch.cat([(model.cls_token.weight + model.pos_embed.weight[:, :1]).expand(2, -1, -1), x], dim=1)
    with torch.no_grad():
        for blk in mae.blocks:
            x = blk(x)
        torch.testing.assert_close(model.features(images), mae.norm(x))


def test_raw_pixel_targets_match_mae_reference():
    """norm_pix_loss=False: the released ViP pre-training command's loss."""
    model = _tiny_moved(norm_pix_loss=False)
    images, noise = torch.randn(3, 3, 32, 32), torch.rand(3, 16)
    with torch.no_grad():
        loss = model(images, noise=noise)
        torch.testing.assert_close(loss, _mae_reference(model, images, noise, 0.75, norm_pix_loss=False))
        assert not torch.allclose(loss, _mae_reference(model, images, noise, 0.75))


def test_original_mae_layout_round_trip():
    sd = _tiny().state_dict()
    mae = models.to_mae_state_dict(sd)
    assert {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"} <= set(mae)
    assert not any(k.endswith(("cls_token.weight", "pos_embed.weight", "mask_token.weight")) for k in mae)
    assert "blocks.0.attn.qkv.weight" in mae and "decoder_pred.weight" in mae
    back = models.convert_mae_state_dict(mae)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)


def test_patchify_order():
    """Patch (row i, column j) holds pixels [:, 16i:16i+16, 16j:16j+16], channel last."""
    model = _tiny()
    images = torch.randn(2, 3, 32, 32)
    patches = model.patchify(images)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    torch.testing.assert_close(patches[:, 1 * 4 + 2].view(2, 8, 8, 3), images[:, :, 8:16, 16:24].permute(0, 2, 3, 1))


def test_features_and_random_masks():
    model = _tiny()
    images = torch.randn(2, 3, 32, 32)
    assert model.features(images).shape == (2, 17, 32)
    with torch.no_grad():
        assert not torch.equal(model(images), model(images))  # a fresh mask each call
        loss = model(images)
    assert torch.isfinite(loss).all()


def test_errors():
    model = _tiny()
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(torch.randn(2, 3, 32, 32), mask_ratio=0.0)
    with pytest.raises(ValueError, match="noise"):
        model(torch.randn(2, 3, 32, 32), noise=torch.rand(2, 15))
    with pytest.raises(ValueError, match="vocab_size"):
        models.create_model("vip_base", vocab_size=10)


def test_training_forward_traces_without_graph_breaks():
    model = _tiny()
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(images, noise=noise), model(images, noise=noise))
