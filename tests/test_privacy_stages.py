"""The engine's stages, each alone: install (privacy/install.py), clipping
(privacy/clipping.py) and the step (privacy/step.py)."""

import math

import pytest
import torch
from torch import nn

from privacy.clipping import ClipStatistics, Clipping, clip_factors
from privacy.install import Installation, find_targets
from privacy.rules import DEFAULT_RULES
from privacy.rules.base import Context
from privacy.step import NoiseGenerators, StepSums, add_noise, noise_generator, scale_grad
from tests.helpers.privacy import flat_norms, per_example_grads

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- the step

def test_add_noise_draws_std_sigma_c_from_the_step_generator_once():
    local = torch.linspace(-3.0, 3.0, 50_000)
    before = local.clone()
    std = 1.5 * 0.75  # sigma * C
    noised = add_noise(local, std, NoiseGenerators(seed=7, noise_stream=2, step=3))
    expected = torch.randn(local.shape, generator=noise_generator(7, 2, 3, 0, CPU))
    torch.testing.assert_close(noised, torch.add(before, expected, alpha=std), rtol=0, atol=0)
    assert torch.equal(local, before)  # the reducer's tensor is not changed
    assert (noised - before).std().item() == pytest.approx(std, rel=0.01)


def test_noise_generators_differ_by_step_stream_and_device_index():
    draws = {key: torch.randn(4, generator=noise_generator(*key, CPU)) for key in
             [(7, 0, 0, 0), (7, 0, 1, 0), (7, 1, 0, 0), (7, 0, 0, 1), (8, 0, 0, 0)]}
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(draws)
    again = torch.randn(4, generator=noise_generator(7, 0, 0, 0, CPU))
    assert torch.equal(again, draws[(7, 0, 0, 0)])
    generators = NoiseGenerators(7, 0, 0)
    assert generators.on(CPU) is generators.on(CPU)  # one generator per device for the whole step


def test_no_noise_returns_the_sum_itself_and_scaling_copies_it():
    local = torch.ones(5)
    assert add_noise(local, 0.0, NoiseGenerators(0, 0, 0)) is local
    scaled = scale_grad(local, 4.0, owned=False)
    assert torch.equal(local, torch.ones(5)) and torch.equal(scaled, torch.full((5,), 0.25))
    own = torch.ones(5)
    assert scale_grad(own, 4.0, owned=True) is own and torch.equal(own, torch.full((5,), 0.25))


def test_step_sums_keep_the_first_sum_add_the_rest_and_pop_zeros_for_unused_layers():
    module = nn.Linear(2, 3)
    sums = StepSums({(module, "weight"): (3, 2), (module, "bias"): (3,)})
    assert not sums
    first = torch.arange(6.0)
    sums.add(module, "weight", first)
    sums.layer(module, CPU).add("weight", torch.ones(6))
    assert sums
    summed = sums.pop(module, "weight", CPU)
    assert summed.data_ptr() == first.data_ptr()  # kept as it came (no zeros, no copy), added into
    torch.testing.assert_close(summed, torch.arange(1.0, 7.0).view(3, 2))
    torch.testing.assert_close(sums.pop(module, "bias", CPU), torch.zeros(3))
    assert not sums


# ----------------------------------------------------------------------------- clipping

def test_clip_factors_are_min_1_c_over_the_margined_norm_and_zero_when_not_finite():
    sq = torch.tensor([0.0, 0.25, 1.0, 4.0, 1e4, math.inf, math.nan])
    ghost = torch.tensor([0.0, 1.0, 0.5, 2.0, 3.0, 1.0, 1.0])
    u = 2.0**-8 + 10 * 2.0**-24
    for bounds in ({}, {u: [ghost]}):
        scale, norms = clip_factors(1.0, [sq / 2, sq / 2], bounds, 7, CPU)
        sq64, b64 = sq.double(), (ghost.double() if bounds else torch.zeros(7, dtype=torch.float64))
        margined = (sq64 + 2.0**-20 * (sq64 + b64.square())).sqrt()
        error = (sq64 * 2.0**-48 + (b64 * u * (1 + 2.0**-12)).square()).sqrt()
        upper = margined + error + 1e-6
        expected = torch.where(torch.isfinite(upper), (1.0 / upper).clamp(max=1.0), 0.0)
        torch.testing.assert_close(scale.double(), expected, rtol=1e-6, atol=0)
        assert scale[0] == 1.0 and scale[1] == 1.0 and 0 < scale[2] < 1.0 and scale[5] == 0 and scale[6] == 0
        torch.testing.assert_close(norms[:5], sq[:5].sqrt())


def test_clip_statistics_count_each_micro_batch_once_and_reset():
    stats = ClipStatistics()
    stats.record(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.5]))
    stats.record(torch.tensor([math.nan]), torch.tensor([0.0]))
    read = stats.pop(step=4)
    assert read["step"] == 4 and read["examples"] == 3 and read["skipped_nonfinite"] == 1
    assert read["clip_fraction"] == 0.5 and read["norm_mean"] == 2.0 and read["norm_max"] == 3.0
    assert stats.pop(step=5) == {"step": 5, "examples": 0, "skipped_nonfinite": 0, "clip_fraction": 0.0}


def test_clipping_stage_on_an_installation_gives_the_per_example_norms():
    """Install and clipping without the engine: one backward, norms against torch.func."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 1))
    x = torch.randn(6, 4)
    installation = Installation(model, DEFAULT_RULES)
    sums = StepSums(installation.shapes)
    clipping = Clipping(installation, sums, max_grad_norm=1e9)
    installation.attach(clipping)
    scale = clipping.run(model(x).squeeze(1), Context("cpu", 6), views=1)
    installation.detach()
    assert torch.equal(scale, torch.ones(6))
    reference = per_example_grads(model, x)
    torch.testing.assert_close(clipping.per_example_norms, flat_norms(reference), rtol=1e-5, atol=0)
    for module, name, qualified in installation.clipped:  # unclipped: the plain sum of the gradients
        torch.testing.assert_close(sums.pop(module, name, CPU), reference[qualified].sum(0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- install

def test_install_refuses_batchnorm():
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d\) normalises over the examples of a batch"):
        find_targets(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), DEFAULT_RULES)


class Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return self.linear(x) * self.gain


def test_install_finds_rules_and_bare_owners_and_detach_restores_forwards():
    model = Gain()
    targets, owners = find_targets(model, DEFAULT_RULES)
    assert [(t.qualname, t.names) for t in targets] == [("linear", ("weight", "bias"))]
    assert [(o.qualname, o.names) for o in owners] == [("", ("gain",))]
    installation = Installation(model, DEFAULT_RULES)
    assert "forward" not in model.linear.__dict__  # nothing wrapped before attach
    installation.attach(sink=None)
    assert "forward" in model.linear.__dict__ and installation.shapes[(model, "gain")] == (4,)
    installation.detach()
    assert "forward" not in model.linear.__dict__ and not model._forward_pre_hooks
