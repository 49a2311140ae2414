"""ViP (Yu et al., 2023): a masked autoencoder (He et al., MAE) trained with DP.

    images [B, 3, H, W] --patch embed, + cls, + pos--> [B, 1 + L, D]
        --keep (1 - mask_ratio) of the L patches--> ViT encoder --> [B, 1 + K, D]
        --decoder_embed, + mask tokens, unshuffle, + pos--> [B, 1 + L, Dd]
        --decoder blocks, LN, Linear--> pixels [B, L, p*p*3]
    loss: MSE to the per-patch normalised pixels (or the raw ones) on the masked patches, per example.

Unlike MAE, every parameter is trained, the position embeddings included (they
start from the fixed 2-D sin-cos values); position embeddings, the CLS token and
the mask token are AddedParameter layers so that the privacy engine clips them.
"""

from dataclasses import dataclass

import torch
from torch import nn

from models.layers import Block, PatchEmbed, init_weights_, sincos_2d
from privacy.layers import AddedParameter


@dataclass(frozen=True, kw_only=True)
class ViPConfig:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768  # encoder: ViT-B/16
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512  # pixel decoder
    decoder_depth: int = 4
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    # targets: per-patch normalised pixels (MAE's norm_pix_loss, as ViP trains); False: the pixels as
    # given, which is what ViP-MAE's released pre-training command trains on
    norm_pix_loss: bool = True


class ViP(nn.Module):
    def __init__(self, config: ViPConfig):
        super().__init__()
        self.config = c = config
        D, Dd = c.embed_dim, c.decoder_embed_dim
        # encoder
        self.patch_embed = PatchEmbed(c.img_size, c.patch_size, D)
        L = self.patch_embed.num_patches
        self.cls_token = AddedParameter(1, 1, D)
        self.pos_embed = AddedParameter(1, 1 + L, D)
        self.blocks = nn.ModuleList([Block(D, c.num_heads, c.mlp_ratio, qkv_bias=True) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        # decoder
        self.decoder_embed = nn.Linear(D, Dd)
        self.mask_token = AddedParameter(1, 1, Dd)
        self.decoder_pos_embed = AddedParameter(1, 1 + L, Dd)
        self.decoder_blocks = nn.ModuleList(
            [Block(Dd, c.decoder_num_heads, c.mlp_ratio, qkv_bias=True) for _ in range(c.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, c.patch_size**2 * 3)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE's initialisation (also after ``to_empty`` from the meta device)."""
        c, grid = self.config, self.patch_embed.grid_size
        init_weights_(self)
        self.pos_embed.weight.copy_(sincos_2d(c.embed_dim, grid, cls_token=True))
        self.decoder_pos_embed.weight.copy_(sincos_2d(c.decoder_embed_dim, grid, cls_token=True))
        nn.init.normal_(self.cls_token.weight, std=0.02)
        nn.init.normal_(self.mask_token.weight, std=0.02)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> [cls, patches] + pos: [B, 1 + L, D]."""
        x = self.patch_embed(images)  # [B, L, D]
        cls = self.cls_token(x.new_zeros(x.shape[0], 1, x.shape[2]))  # [B, 1, D]
        return self.pos_embed(torch.cat([cls, x], dim=1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> encoder tokens [B, 1 + L, D], nothing masked (probes pool them)."""
        x = self._embed(images)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(
        self, images: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """images [B, 3, H, W] -> per-example loss [B].

        Each example keeps the ``int(L * (1 - mask_ratio))`` patches with the
        smallest ``noise`` [B, L] (uniform random when not given; pass it for a
        reproducible mask)."""
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}")
        x = self._embed(images)  # [B, 1 + L, D]
        B, L1, D = x.shape
        L = L1 - 1
        keep = int(L * (1 - mask_ratio))  # MAE's count
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        elif noise.shape != (B, L):
            raise ValueError(f"noise must have shape [B, L] = [{B}, {L}], got {list(noise.shape)}")
        ids_shuffle = noise.argsort(dim=1)  # ascending: the first `keep` are kept
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :keep]
        patches = x[:, 1:].gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # [B, K, D]
        x = torch.cat([x[:, :1], patches], dim=1)  # [B, 1 + K, D]
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))  # [B, 1 + K, Dd]
        Dd = x.shape[2]
        masked = self.mask_token(x.new_zeros(B, L - keep, Dd))  # [B, L - K, Dd]
        patches = torch.cat([x[:, 1:], masked], dim=1).gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))
        x = self.decoder_pos_embed(torch.cat([x[:, :1], patches], dim=1))  # [B, 1 + L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x[:, 1:]))  # [B, L, p*p*3]
        mask = (ids_restore >= keep).to(pred.dtype)  # [B, L], 1 = masked
        return self.loss(images, pred, mask)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, L, p*p*3], MAE's (row, column, channel-last) order."""
        p = self.config.patch_size
        B, C, H, W = images.shape
        x = images.reshape(B, C, H // p, p, W // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)

    def loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-example MSE to the (per-patch normalised) pixels on the masked patches: [B]."""
        target = self.patchify(images).float()
        if self.config.norm_pix_loss:
            target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = (pred.float() - target).square().mean(dim=-1)  # [B, L]
        mask = mask.float()
        return (per_patch * mask).sum(dim=1) / mask.sum(dim=1)


CONFIGS = {"vip_base": ViPConfig()}
