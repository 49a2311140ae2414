"""Each layer rule on its own, against float64 torch.func per-example
gradients, over generated shapes.

A rule's forward must compute what the layer's own forward computes (checked
against the module itself: for timm's layers, the installed timm's code), its
grad_input the gradient autograd gives the input, and its prepare the
per-example squared norms and the clipped sum ``sum_i c_i g_i``. Rows grouped
k per example (Swin's windows: k x b rows) are checked too: an example's
gradient is then the sum over its k rows.
"""

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from privacy.rules import DEFAULT_RULES, find_rule
from privacy.rules.base import Call, ClipFactors, Context

timm_norm = pytest.importorskip("timm.layers.norm")
timm_scale = pytest.importorskip("timm.layers.layer_scale")

B = 3


class DictSums:
    """The engine's sums for one layer: fp32 tensors by parameter name."""

    def __init__(self, module: nn.Module):
        self.values = {name: torch.zeros(p.numel()) for name, p in module.named_parameters(recurse=False)}

    def add(self, name, value):
        self.values[name] += value.reshape(-1)

    def buffer(self, name):
        return self.values[name]


def randomise(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Parameters away from their init (a norm's weight of ones hides a wrong formula)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return module


def reference(module: nn.Module, x: torch.Tensor, g: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """float64 per-example gradients of sum(module(x) * g), k consecutive rows per example."""
    module = copy.deepcopy(module).double()
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False)}

    def of_one(p, xi, gi):
        return (functional_call(module, p, (xi,)) * gi).sum()

    def by_example(t):
        return t.double().reshape(B, k, *t.shape[1:])

    return vmap(grad(of_one), in_dims=(None, 0, 0))(params, by_example(x), by_example(g))


def check_rule(module: nn.Module, x: torch.Tensor, k: int = 1, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    randomise(module, generator)
    _, rule = find_rule(module, DEFAULT_RULES)
    rule.check(module, "layer")
    names = [n for n, _ in module.named_parameters(recurse=False)]

    call = Call()
    with torch.no_grad():
        out = rule.forward(module, call, x, *[getattr(module, slot, None) for slot in rule.slots])
    x_ref = x.clone().requires_grad_(True)
    expected_out = module(x_ref)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape, generator=generator)
    call.grad = g
    (expected_grad_x,) = torch.autograd.grad(expected_out, x_ref, g)
    torch.testing.assert_close(rule.grad_input(module, call, g), expected_grad_x, rtol=1e-5, atol=1e-5)

    sums = DictSums(module)
    prepared = rule.prepare(module, names, [call], Context("cpu", None if k == 1 else B), sums)
    per_example = reference(module, x, g, k)
    sq = sum(r.double().flatten(1).square().sum(1) for r in prepared.rows.values())
    if prepared.sq_norm is not None:
        sq = sq + prepared.sq_norm.double()
    assert set(prepared.rows) | ({"weight"} if prepared.accumulate else set()) == set(names)
    expected_sq = sum(v.flatten(1).square().sum(1) for v in per_example.values())
    torch.testing.assert_close(sq, expected_sq, rtol=1e-5, atol=0)

    factors = torch.rand(B, generator=generator)
    factors[0] = 0.0  # a dropped example contributes nothing
    if prepared.accumulate is not None:
        prepared.accumulate(ClipFactors(factors))
    for name, rows in prepared.rows.items():
        sums.add(name, torch.einsum("b,b...->...", factors, rows))
    for name, value in per_example.items():
        expected = torch.einsum("b,b...->...", factors.double(), value).reshape(-1).float()
        torch.testing.assert_close(sums.values[name], expected, rtol=1e-5, atol=1e-5, msg=name)


def pick(generator: torch.Generator, *choices):
    return choices[int(torch.randint(len(choices), (1,), generator=generator))]


SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("make", [nn.GroupNorm, timm_norm.GroupNorm])
def test_group_norm(make, k, seed):
    gen = torch.Generator().manual_seed(seed)
    groups = pick(gen, 1, 2, 3)
    channels = groups * pick(gen, 1, 2, 4)
    spatial = pick(gen, (), (5,), (3, 4))
    x = torch.randn(k * B, channels, *spatial, generator=gen)
    check_rule(make(num_groups=groups, num_channels=channels, eps=1e-5), x, k, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_group_norm_1(seed):
    gen = torch.Generator().manual_seed(seed)
    channels = pick(gen, 2, 5)
    check_rule(timm_norm.GroupNorm1(channels), torch.randn(B, channels, 3, 3, generator=gen), 1, seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2])
def test_rms_norm(k, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = pick(gen, (6,), (3, 4))
    tokens = pick(gen, (), (5,))
    eps = pick(gen, None, 1e-6)
    check_rule(nn.RMSNorm(shape, eps=eps), torch.randn(k * B, *tokens, *shape, generator=gen), k, seed)
    dim = shape[-1]
    check_rule(timm_norm.RmsNorm(dim), torch.randn(k * B, *tokens, dim, generator=gen), k, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_timm_channels_first_norms(seed):
    """LayerNorm2d and RmsNorm2d: a norm over dim 1 of NCHW."""
    gen = torch.Generator().manual_seed(seed)
    channels, h, w = pick(gen, 3, 8), pick(gen, 1, 4), pick(gen, 2, 5)
    check_rule(timm_norm.LayerNorm2d(channels), torch.randn(B, channels, h, w, generator=gen), 1, seed)
    check_rule(timm_norm.RmsNorm2d(channels), torch.randn(B, channels, h, w, generator=gen), 1, seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2])
def test_timm_layer_norm(k, seed):
    gen = torch.Generator().manual_seed(seed)
    dim, tokens = pick(gen, 4, 12), pick(gen, (), (7,))
    check_rule(timm_norm.LayerNorm(dim), torch.randn(k * B, *tokens, dim, generator=gen), k, seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("k", [1, 2])
def test_layer_scale(k, seed):
    gen = torch.Generator().manual_seed(seed)
    dim = pick(gen, 3, 10)
    check_rule(timm_scale.LayerScale(dim), torch.randn(k * B, pick(gen, 1, 6), dim, generator=gen), k, seed)
    x = torch.randn(k * B, dim, 3, pick(gen, 2, 4), generator=gen)
    check_rule(timm_scale.LayerScale2d(dim), x, k, seed)


@pytest.mark.parametrize("seed", SEEDS + [3, 4, 5])
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("kind", ["grouped", "depthwise", "dense"])
def test_conv(kind, dims, seed):
    """Grouped, depthwise and groups=1 Conv1d/Conv2d with generated kernel,
    stride, padding, dilation and bias."""
    gen = torch.Generator().manual_seed(seed)
    groups = {"grouped": pick(gen, 2, 3), "depthwise": None, "dense": 1}[kind]
    per_group = pick(gen, 1, 2)
    in_channels = (groups or pick(gen, 2, 4)) * per_group
    groups = groups or in_channels
    out_channels = groups * pick(gen, 1, 2)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(
        in_channels, out_channels, kernel_size=pick(gen, 1, 3), stride=pick(gen, 1, 2), padding=pick(gen, 0, 1),
        dilation=pick(gen, 1, 2), groups=groups, bias=pick(gen, True, False))
    size = (pick(gen, 7, 9),) * dims
    k = pick(gen, 1, 2)
    check_rule(conv, torch.randn(k * B, in_channels, *size, generator=gen), k, seed)


def test_timm_norms_are_found_by_name_not_by_import():
    """privacy/ never imports timm: its layers are registered by qualified name,
    and a subclass of a registered class finds its parent's rule."""
    found = find_rule(timm_norm.LayerNorm2d(4), DEFAULT_RULES)
    assert found[0] is timm_norm.LayerNorm2d
    assert "timm.layers.norm.LayerNorm2d" in DEFAULT_RULES
    assert not any(isinstance(key, type) and key.__module__.startswith("timm") for key in DEFAULT_RULES)
