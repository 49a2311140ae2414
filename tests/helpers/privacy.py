"""Small models made of every supported layer, and independent references.

The reference per-example gradients come from torch.func (vmap of grad over
single examples), which shares nothing with the engine's arithmetic.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from privacy.layers import AddedParameter


class Attention(nn.Module):
    """Multi-head attention from separate Linear layers; optional causal mask."""

    def __init__(self, dim: int, heads: int, fused_qkv: bool, bias: bool):
        super().__init__()
        self.heads = heads
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        else:
            self.q = nn.Linear(dim, dim, bias=bias)
            self.k = nn.Linear(dim, dim, bias=bias)
            self.v = nn.Linear(dim, dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def split(self, x):  # [B, T, D] -> [B, H, T, D/H]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x, memory=None, causal=False):
        if self.fused_qkv:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            source = x if memory is None else memory
            q, k, v = self.q(x), self.k(source), self.v(source)
        out = F.scaled_dot_product_attention(self.split(q), self.split(k), self.split(v), is_causal=causal)
        return self.proj(out.transpose(1, 2).flatten(2))


class TinyViT(nn.Module):
    """Patch conv, CLS token, position embedding, one pre-norm block, head."""

    def __init__(self, img=16, patch=4, dim=32, heads=4, classes=10):
        super().__init__()
        tokens = (img // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = AddedParameter(1, 1, dim, init_std=0.02)
        self.pos_embed = AddedParameter(1, tokens, dim, init_std=0.02)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, fused_qkv=True, bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, images, labels):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, L, D]
        cls = self.cls_token(x.new_zeros(x.shape[0], 1, x.shape[2]))
        x = self.pos_embed(torch.cat([cls, x], dim=1))
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        logits = self.head(self.norm(x)[:, 0])
        return F.cross_entropy(logits.float(), labels, reduction="none")


class TinyDecoder(nn.Module):
    """Embedding with padding, position embedding, post-norm layer with causal
    self-attention and cross-attention to a memory, LN + Linear head."""

    def __init__(self, vocab=20, dim=24, heads=3, length=7, feat=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = AddedParameter(1, length, dim, init_std=0.02)
        self.memory = nn.Linear(feat, dim)
        self.self_attn = Attention(dim, heads, fused_qkv=False, bias=False)
        self.cross_attn = Attention(dim, heads, fused_qkv=False, bias=False)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn1 = nn.Linear(dim, 2 * dim, bias=False)
        self.ffn2 = nn.Linear(2 * dim, dim, bias=False)
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, features, tokens):
        memory = self.memory(features)
        x = self.pos(self.embed(tokens))
        x = self.norm1(x + self.self_attn(x, causal=True))
        x = self.norm2(x + self.cross_attn(x, memory=memory))
        x = self.norm3(x + self.ffn2(F.gelu(self.ffn1(x))))
        logits = self.head(self.head_norm(x)).float()
        targets = tokens[:, 1:]
        per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=0, reduction="none")
        return per_token.sum(1) / (targets != 0).sum(1).clamp(min=1)


class OddLayers(nn.Module):
    """Rules off the beaten path: a general Conv2d (padding, overlapping
    stride, no bias), a Linear on a rank-4 input with the materialised norm,
    a Linear on a rank-2 input, a LayerNorm over two dims, a layer applied
    twice in one forward, a frozen layer, and an AddedParameter broadcast over
    two dims."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1, bias=False)
        self.small = nn.Linear(3, 2)  # applied to [B, H, W, 3]: 2 T^2 >= p d -> materialised
        self.norm = nn.LayerNorm([4, 2])
        self.shift = AddedParameter(1, 1, 2, init_std=0.1)
        self.twice = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.out = nn.Linear(8, 1)

    def forward(self, images, targets):
        x = self.conv(images).permute(0, 2, 3, 1)  # [B, 4, 4, 3]
        x = self.small(x)  # [B, 4, 4, 2]
        x = self.shift(self.norm(x))
        x = x.flatten(2).mean(1)  # [B, 8]
        x = self.twice(torch.tanh(self.twice(x)))
        x = self.frozen(x)
        return (self.out(x).squeeze(1) - targets) ** 2


class PerExampleLoss(nn.Module):
    """A classifier's per-example cross-entropy: as benchmarks.suite.PerExampleCrossEntropy, but
    in the logits' own dtype (that one casts to fp32, which would round the float64 reference)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images, labels):
        return F.cross_entropy(self.classifier(images), labels, reduction="none")


def classification_batch(batch: int, size: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random RGB images of ``size`` x ``size`` pixels and their labels, from seed 1."""
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, size, size, generator=generator),
            torch.randint(0, classes, (batch,), generator=generator))


def vit_batch(b, generator):
    return torch.randn(b, 3, 16, 16, generator=generator), torch.randint(0, 10, (b,), generator=generator)


def decoder_batch(b, generator, vocab=20, length=7):
    tokens = torch.randint(1, vocab, (b, length), generator=generator)
    # pads inside the sequence feed later real tokens, so a wrong padding rule shows
    pads = torch.rand(b, length, generator=generator) < 0.3
    pads[:, 0] = False
    tokens = torch.where(pads, 0, tokens)
    return torch.randn(b, 5, 10, generator=generator), tokens


def odd_batch(b, generator):
    return torch.randn(b, 2, 8, 8, generator=generator), torch.randn(b, generator=generator)


def per_example_grads(model: nn.Module, *inputs) -> dict[str, torch.Tensor]:
    """name -> [b, *shape] per-example gradients of model(*inputs)[i]."""
    model = copy.deepcopy(model)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}

    def loss_of_one(params, *example):
        batch = tuple(t.unsqueeze(0) for t in example)
        return functional_call(model, (params, frozen), batch).sum()

    return vmap(grad(loss_of_one), in_dims=(None,) + (0,) * len(inputs))(trainable, *inputs)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def flat_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example norms over all parameters, in float64 (an fp32 norm of a long
    vector is off by up to 1e-4 relative on CPU)."""
    return torch.cat([g.double().flatten(1) for g in grads.values()], 1).norm(dim=1).float()


def clipped_mean(grads: dict[str, torch.Tensor], max_norm: float, expected_batch: float) -> dict[str, torch.Tensor]:
    """(1/B) sum_i min(1, C / (||g_i|| + 1e-6)) g_i, examples with non-finite norm dropped."""
    norms = flat_norms(grads)
    scale = torch.where(torch.isfinite(norms), (max_norm / (norms + 1e-6)).clamp(max=1.0), 0.0)
    out = {}
    for name, g in grads.items():
        g = torch.where(scale.view(-1, *[1] * (g.dim() - 1)) > 0, g, 0.0)
        out[name] = torch.einsum("b,b...->...", scale.double(), g.double()).float() / expected_batch
    return out


def step_in_micro_batches(engine, model: nn.Module, inputs: tuple, splits) -> torch.Tensor:
    """One private step of ``engine`` over ``inputs`` cut into micro-batches of ``splits``
    examples (then detached); the per-example norms, in order."""
    norms, start = [], 0
    for size in splits:
        engine.backward(model(*(t[start:start + size] for t in inputs)))
        norms.append(engine.per_example_norms)
        start += size
    engine.finish_step()
    engine.detach()
    return torch.cat(norms)


def assert_engine_matches_reference(model: nn.Module, inputs: tuple, splits=(1, 2, 3), expected_batch=7.5,
                                    **engine_args) -> None:
    """The engine's per-example norms and clipped gradients over micro-batches
    ``splits`` of ``inputs`` against float64 torch.func, the bound binding for
    some examples only: norms within 1e-5 relative, each gradient within 1e-5
    of its own norm (plus 1e-7 of the whole gradient's, for parameters whose
    gradient is zero in exact arithmetic, such as attention's key bias)."""
    from privacy import PrivacyEngine

    reference = per_example_grads(copy.deepcopy(model).double(), *(
        t.double() if t.is_floating_point() else t for t in inputs))
    norms = flat_norms(reference)
    max_norm = norms.median().item()
    assert (norms > max_norm).any() and (norms < max_norm).any()
    expected = clipped_mean(reference, max_norm, expected_batch)
    engine = PrivacyEngine(model, max_grad_norm=max_norm, noise_multiplier=0.0, expected_batch_size=expected_batch,
                           **engine_args)
    assert sorted(engine.covered_parameters) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(step_in_micro_batches(engine, model, inputs, splits), norms, rtol=1e-5, atol=0)
    whole = torch.cat([g.flatten() for g in expected.values()]).norm()
    for name, param in model.named_parameters():
        error = (param.grad - expected[name]).norm()
        assert error <= 1e-5 * expected[name].norm() + 1e-7 * whole, (name, error.item())
