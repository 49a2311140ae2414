"""Deliberately broken privacy engines (and a sampler), for testing that the audit catches them.

Each has PrivacyEngine's constructor and methods and breaks DP the way real
libraries have, through the public interface only (constructor arguments,
public methods, the model and reducer it is given), so they keep working
whatever the engine's internals become. Audit one with

    python -m privacy.audit --engine tests.helpers.broken_engines:SkipClipping --out /tmp/audit
    python -m privacy.audit --sampler tests.helpers.broken_engines:OversampledPoisson --out /tmp/audit

The first five are grossly broken; the last three are the small
miscalibrations (20 to 50 percent) that only a tight audit catches.

None of this belongs in the product.
"""

import copy

import torch
from torch import Tensor

from privacy import PrivacyEngine
from privacy.sampling import PoissonSampler

# SkipClipping's clipping bound, in units of the real one: no per-example gradient reaches it
LOOSE_BOUND = 1e6
NOISE_SHORTFALL = 0.8  # NoiseTooSmall's noise, in units of the claimed one
CLIP_EXCESS = 1.25     # ClipTooLoose's clipping bound, in units of the claimed one
OVERSAMPLING = 1.5     # OversampledPoisson's rate, in units of the claimed q


class SkipClipping(PrivacyEngine):
    """Clips at a bound no gradient reaches, with the noise still scaled to the real
    bound (std sigma * C): every example's full gradient goes into the sum."""

    def __init__(self, model, max_grad_norm, noise_multiplier, expected_batch_size, seed=None, reducer=None,
                 *, rules=None):
        super().__init__(model, max_grad_norm * LOOSE_BOUND, noise_multiplier / LOOSE_BOUND, expected_batch_size,
                         seed, reducer, rules=rules)


class NoiseDividedTwice(PrivacyEngine):
    """Treats sigma as the noise of the averaged gradient and divides it by the batch
    size itself; the engine divides (sum + noise) by B again, so the noise is B times too small."""

    def __init__(self, model, max_grad_norm, noise_multiplier, expected_batch_size, seed=None, reducer=None,
                 *, rules=None):
        super().__init__(model, max_grad_norm, noise_multiplier / expected_batch_size, expected_batch_size,
                         seed, reducer, rules=rules)


class NoiseOnRankZero(PrivacyEngine):
    """Adds noise on the first rank only, as if the noise were added before a sum over
    ranks; but the reducer sums first and every rank releases its own shard, so the
    shards of the other ranks carry no noise at all."""

    def __init__(self, model, max_grad_norm, noise_multiplier, expected_batch_size, seed=None, reducer=None,
                 *, rules=None):
        first_rank = reducer is None or reducer.noise_stream == 0
        super().__init__(model, max_grad_norm, noise_multiplier if first_rank else 0.0, expected_batch_size,
                         seed, reducer, rules=rules)


class SameNoiseEveryStep(PrivacyEngine):
    """Rewinds its step counter after every step (as a resume that always reloads step
    0 would): the noise generator, seeded by (seed, step), draws the same noise every step."""

    def finish_step(self) -> dict[str, float]:
        stats = super().finish_step()
        self.load_state_dict(self.state_dict() | {"step": 0})
        return stats


class LeakUnclipped(PrivacyEngine):
    """Also adds the plain (unclipped, noise-free) gradient of the batch, as a second
    code path would that trains an auxiliary loss on the private batch with ordinary
    autograd. It computes that gradient on a shadow copy of the model, which is
    synchronised before every micro-batch, from the inputs a forward pre-hook records.
    (Attribute names are prefixed so they cannot collide with the engine's own.)"""

    def __init__(self, model, max_grad_norm, noise_multiplier, expected_batch_size, seed=None, reducer=None,
                 *, rules=None):
        self._leak_model = model
        self._leak_shadow = copy.deepcopy(model)  # before the engine replaces the layers' forwards
        self._leak_inputs: list[tuple] = []
        self._leak_sums: dict[str, Tensor] = {}
        self._leak_batch = expected_batch_size
        model.register_forward_pre_hook(lambda module, args: self._leak_inputs.append(args))
        super().__init__(model, max_grad_norm, noise_multiplier, expected_batch_size, seed, reducer, rules=rules)

    def backward(self, per_example_loss: Tensor) -> None:
        super().backward(per_example_loss)
        inputs = self._leak_inputs[-1]
        self._leak_inputs.clear()
        self._leak_shadow.load_state_dict(self._leak_model.state_dict())
        named = [(n, p) for n, p in self._leak_shadow.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(self._leak_shadow(*inputs).sum(), [p for _, p in named], allow_unused=True)
        for (name, _), grad in zip(named, grads):
            if grad is not None:
                self._leak_sums[name] = self._leak_sums.get(name, 0) + grad

    def finish_step(self) -> dict[str, float]:
        stats = super().finish_step()
        for name, param in self._leak_model.named_parameters():
            if name in self._leak_sums:
                param.grad = param.grad + self._leak_sums[name].to(param.grad.dtype) / self._leak_batch
        self._leak_sums.clear()
        return stats


class NoiseTooSmall(PrivacyEngine):
    """Noise std NOISE_SHORTFALL * sigma * C, as a wrong constant in a calibration would give."""

    def __init__(self, model, max_grad_norm, noise_multiplier, expected_batch_size, seed=None, reducer=None,
                 *, rules=None):
        super().__init__(model, max_grad_norm, noise_multiplier * NOISE_SHORTFALL, expected_batch_size, seed,
                         reducer, rules=rules)


class ClipTooLoose(PrivacyEngine):
    """Clips at CLIP_EXCESS * C but scales the noise to C (std sigma * C), as a clipping
    bound read from one setting and a noise scale from another would."""

    def __init__(self, model, max_grad_norm, noise_multiplier, expected_batch_size, seed=None, reducer=None,
                 *, rules=None):
        super().__init__(model, max_grad_norm * CLIP_EXCESS, noise_multiplier / CLIP_EXCESS, expected_batch_size,
                         seed, reducer, rules=rules)


class OversampledPoisson(PoissonSampler):
    """Draws every example with probability OVERSAMPLING * q (at most 1) but reports the
    claimed expected batch q * N, so the engine divides by it: the accountant's q is wrong."""

    def __init__(self, num_examples, sample_rate, seed, world_size=1, rank=0, *, max_physical_batch):
        super().__init__(num_examples, min(1.0, sample_rate * OVERSAMPLING), seed, world_size, rank,
                         max_physical_batch=max_physical_batch)
        self.claimed_rate = sample_rate

    @property
    def expected_batch_size(self) -> float:
        return self.claimed_rate * self.num_examples


BROKEN_ENGINES: dict[str, type[PrivacyEngine]] = {
    cls.__name__: cls for cls in (SkipClipping, NoiseDividedTwice, NoiseOnRankZero, SameNoiseEveryStep, LeakUnclipped)
}
# small miscalibrations: (engine, sampler) pairs
MISCALIBRATED = {"NoiseTooSmall": (NoiseTooSmall, PoissonSampler), "ClipTooLoose": (ClipTooLoose, PoissonSampler),
                 "OversampledPoisson": (PrivacyEngine, OversampledPoisson)}
