"""Deliberately broken privacy engines, for testing that the audit catches them.

Each has PrivacyEngine's constructor and methods and breaks DP the way real
libraries have, through the public interface only (constructor arguments,
public methods, the model and reducer it is given), so they keep working
whatever the engine's internals become. Audit one with

    python -m privacy.audit --engine tests.broken_engines:SkipClipping --out /tmp/audit

None of this belongs in the product.
"""

import copy

import torch
from torch import Tensor

from privacy import PrivacyEngine

# SkipClipping's clipping bound, in units of the real one: no per-example gradient reaches it
LOOSE_BOUND = 1e6


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


BROKEN_ENGINES: dict[str, type[PrivacyEngine]] = {
    cls.__name__: cls for cls in (SkipClipping, NoiseDividedTwice, NoiseOnRankZero, SameNoiseEveryStep, LeakUnclipped)
}
