"""Building blocks shared by DP-Cap and ViP: patch embedding, a pre-norm ViT
block with fused qkv and scaled-dot-product attention, fixed sin-cos position
embeddings, and the initialisation both original code bases use.

Every trainable parameter of the models lives in nn.Linear, nn.LayerNorm,
nn.Conv2d (patch embedding, kernel == stride), nn.Embedding or
privacy.layers.AddedParameter, and every module is called once per training
forward: the privacy engine has a per-example rule for exactly these.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: [B, 3, H, W] -> [B, (H/p)*(W/p), D]."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.proj.in_channels or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected images [B, {self.proj.in_channels}, {self.img_size}, {self.img_size}], got "
                f"{list(x.shape)}: resize the images or build the model with img_size={x.shape[-1]}"
            )
        x = x.to(self.proj.weight.dtype)  # e.g. fp32 images into bf16 weights outside autocast (inference)
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, L, D]


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv, no mask (every token sees every token)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} must be divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, hd]
        x = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(hd)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block (timm layout): x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE's get_1d_sincos_pos_embed_from_grid: [len(pos), dim], sin half then cos half."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding as in MAE: [1, (cls +) grid*grid, dim], fp32,
    CLS row zero. Half the channels encode the column, half the row."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")  # MAE: np.meshgrid(grid_w, grid_h), w first
    emb = torch.cat([_sincos_1d(dim // 2, gw), _sincos_1d(dim // 2, gh)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


def sincos_1d(dim: int, length: int) -> torch.Tensor:
    """Fixed 1-D sin-cos embedding: [1, length, dim], fp32."""
    if dim % 2:
        raise ValueError(f"a 1-D sin-cos position embedding needs an even width, got {dim}")
    return _sincos_1d(dim, torch.arange(length, dtype=torch.float64)).float().unsqueeze(0)


def init_weights_(module: nn.Module) -> None:
    """The original initialisation: xavier-uniform Linear (bias 0), LayerNorm (1, 0),
    patch-embedding conv like a Linear on its flattened kernel."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            m.proj.reset_parameters()  # the conv's default bias init, as the originals keep it
            w = m.proj.weight
            bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))  # xavier on the [D, C*p*p] view
            nn.init.uniform_(w, -bound, bound)
