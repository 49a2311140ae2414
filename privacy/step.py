"""The engine's third stage: the logical step's clipped sums become gradients.

Over a step's micro-batches the layers add their clipped sums to
:class:`StepSums` (one fp32 tensor per clipped parameter). ``finish_step``
then, per parameter and in this order: the reducer's ``reduce`` (this rank's
part of the cross-rank sum), :func:`add_noise` (once per coordinate: each
rank noises only its own part), :func:`scale_grad` (by the expected batch
size, not the drawn one: Poisson sampling's accounting assumes it) and the
reducer's ``assign``. The noise of step k comes from :func:`noise_generator`
seeded with (seed, noise stream, k, device index): a resumed run never reuses
noise, and ranks with distinct streams draw independent noise.
"""

import torch
from torch import Tensor, nn

from privacy.rules.base import FP32
from privacy.seeds import derived_seed


class StepSums:
    """The step's clipped sums: fp32, one per clipped parameter, of its full
    shape (``shapes``, read at construction: a released ZeRO-3 parameter is empty)."""

    def __init__(self, shapes: dict[tuple[nn.Module, str], tuple[int, ...]]):
        self.shapes = shapes
        self._sums: dict[tuple[nn.Module, str], Tensor] = {}

    def __bool__(self) -> bool:
        """Whether any micro-batch of this step added a sum."""
        return bool(self._sums)

    def buffer(self, module: nn.Module, name: str, device: torch.device) -> Tensor:
        key = (module, name)
        if key not in self._sums:
            self._sums[key] = torch.zeros(self.shapes[key], dtype=FP32, device=device)
        return self._sums[key]

    def add(self, module: nn.Module, name: str, value: Tensor) -> None:
        """The step's first sum of a parameter is kept as it is (no zeros, no add)."""
        key = (module, name)
        summed = self._sums.get(key)
        if summed is None:
            self._sums[key] = value.view(self.shapes[key])
        else:
            summed.add_(value.view_as(summed))

    def pop(self, module: nn.Module, name: str, device: torch.device) -> Tensor:
        """The parameter's sum, forgotten here (zeros if no example this step used the layer)."""
        summed = self._sums.pop((module, name), None)
        if summed is None:
            summed = torch.zeros(self.shapes[(module, name)], dtype=FP32, device=device)
        return summed

    def clear(self) -> None:
        self._sums.clear()

    def layer(self, module: nn.Module, device: torch.device) -> "LayerSums":
        return LayerSums(self, module, device)


class LayerSums:
    """One layer's view of the step's sums (privacy.rules.base.Sums)."""

    def __init__(self, sums: StepSums, module: nn.Module, device: torch.device):
        self.sums, self.module, self.device = sums, module, device

    def add(self, name: str, value: Tensor) -> None:
        self.sums.add(self.module, name, value)

    def buffer(self, name: str) -> Tensor:
        return self.sums.buffer(self.module, name, self.device)


def noise_generator(seed: int, noise_stream: int, step: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of step ``step``'s noise on the ``index``-th device a rank
    uses, from the secret ``seed`` and the rank's ``noise_stream``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derived_seed(seed, noise_stream, step, index))
    return generator


class NoiseGenerators:
    """One step's generators, one per device, made at the device's first use."""

    def __init__(self, seed: int, noise_stream: int, step: int):
        self.seed, self.noise_stream, self.step = seed, noise_stream, step
        self._by_device: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        generator = self._by_device.get(device)
        if generator is None:
            generator = noise_generator(self.seed, self.noise_stream, self.step, len(self._by_device), device)
            self._by_device[device] = generator
        return generator


def add_noise(local: Tensor, std: float, generators: NoiseGenerators) -> Tensor:
    """``local + std N(0, I)`` (fp32) as a new tensor; ``local`` itself when ``std`` is 0
    (the reducer's tensor: not to be changed in place)."""
    if std == 0:
        return local
    noise = torch.randn(local.shape, generator=generators.on(local.device), dtype=FP32, device=local.device)
    return torch.add(local, noise, alpha=std)


def scale_grad(grad: Tensor, expected_batch_size: float, owned: bool) -> Tensor:
    """``grad / expected_batch_size``: in place where ``grad`` is the step's own (``owned``)."""
    return grad.div_(expected_batch_size) if owned else grad / expected_batch_size
