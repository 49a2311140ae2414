"""Canaries: tiny models, their training sets with some canaries in, and attack scores.

Both kinds share one layout: a population of ordinary examples that use the
first ``POPULATION_DIMS`` input coordinates, and ``slots`` canary slots, one
input coordinate each that no population example touches. Canary j of a run
lives in slot j (one-run audits) or in a slot drawn at random (many-runs
audits, so a canary is not always owned by the same simulated rank).

- :class:`DiracCanaries` (white box): the model is ``w . x``, a linear loss,
  so an example's gradient is its input. A canary is ``NORM_RATIO * C`` times
  a basis vector: after clipping, exactly C in its own coordinate (a Dirac
  gradient canary), and ``NORM_RATIO`` times more if clipping fails. The
  attacker sees every iterate (the threat model DP-SGD's accounting covers)
  and scores each canary by the log-likelihood ratio of its coordinate's
  updates under the claimed mechanism, "sampled into this step" (a shift of
  C) against "not" (noise only). A second score takes each coordinate's own
  median and spread for the claimed zero and noise, so that noise repeated
  every step shows too; a third is the likelihood ratio maximised over two
  noise scales, the claimed one and none (MIN_SPREAD), so that coordinates
  released without noise show too, while noisy ones score as under the claim.
- :class:`InputCanaries` (black box): a linear softmax classifier trained
  with cross-entropy; a canary is a crafted input (a large value in an unused
  coordinate) with a random label. The attacker sees only the final model's
  loss on the canary. Weaker by design: this is the audit of what a user
  of the released model could learn.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn

from privacy.audit.training import EngineFactory, Mechanism, SamplerFactory, train_private
from privacy.sampling import PoissonSampler

POPULATION_DIMS = 16
NORM_RATIO = 100.0  # canary gradient norm / C: clipped to C, or 100x the signal if clipping is broken
MIN_SPREAD = 0.01  # in units of C: the noise a coordinate is credited with when its updates never vary
CLASSES = 10


def dense_inputs(features: Tensor, slot: Tensor, value: Tensor, slots: int) -> Tensor:
    """Examples stored sparsely (population features [b, P], a canary slot [b] and the value
    in that slot [b], 0 for the population) made dense, [b, P + slots], one micro-batch at a
    time: 10^5 canaries never fill memory."""
    canary = features.new_zeros(len(features), slots).scatter_(1, slot[:, None], value[:, None])
    return torch.cat([features, canary], dim=1)


class DiracLoss(nn.Module):
    """Per-example loss ``w . x`` of one linear layer over ``POPULATION_DIMS + slots`` inputs:
    its per-example gradient is the input itself."""

    def __init__(self, slots: int):
        super().__init__()
        self.slots = slots
        self.probe = nn.Linear(POPULATION_DIMS + slots, 1, bias=False)
        nn.init.zeros_(self.probe.weight)

    def forward(self, features: Tensor, slot: Tensor, value: Tensor) -> Tensor:  # [b, P], [b], [b] -> [b]
        return self.probe(dense_inputs(features, slot, value, self.slots)).squeeze(1)


class SoftmaxRegression(nn.Module):
    """Per-example cross-entropy of a linear classifier over ``POPULATION_DIMS + slots`` inputs."""

    def __init__(self, slots: int, classes: int):
        super().__init__()
        self.slots = slots
        self.classifier = nn.Linear(POPULATION_DIMS + slots, classes)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: Tensor, slot: Tensor, value: Tensor, y: Tensor) -> Tensor:  # [b, P], [b] x 3 -> [b]
        logits = self.classifier(dense_inputs(features, slot, value, self.slots))
        return F.cross_entropy(logits, y, reduction="none")


@dataclass(frozen=True)
class Setting:
    """What every run of one audit shares: the engine, the mechanism, sizes, device.

    The population (the neighbouring dataset D of the DP definition) is drawn
    once from ``seed`` and is the same in every run; runs differ in which
    canaries they add and in their sampling and noise seeds.
    """

    engine: EngineFactory
    mechanism: Mechanism
    population: int  # ordinary examples in every training set
    slots: int       # canary slots in the model (the number of canaries of a one-run audit)
    seed: int = 0
    device: torch.device = torch.device("cpu")
    sampler: SamplerFactory = PoissonSampler  # the batch sampler under test


def _shuffled(dataset: tuple[Tensor, ...], seed: int) -> tuple[Tensor, ...]:
    """The examples in a random order of the run: each rank's Poisson slice is a contiguous
    part of the sorted batch, so canaries appended last would always land on the last rank."""
    order = torch.as_tensor(np.random.default_rng([seed, 2]).permutation(len(dataset[0])))
    return tuple(t[order] for t in dataset)


def _llr(updates: np.ndarray, sample_rate: float, noise: np.ndarray | float) -> np.ndarray:
    """Log-likelihood ratio of "in the dataset" for a canary's updates x (in units of C,
    shape [steps, canaries]) with noise std s, summed over steps:
    log [(1 - q) N(x; 0, s^2) + q N(x; 1, s^2)] / N(x; 0, s^2)."""
    with np.errstate(divide="ignore"):  # q = 1: log(1 - q) = -inf is the right limit
        per_step = np.logaddexp(np.log1p(-sample_rate), np.log(sample_rate) + (2 * updates - 1) / (2 * noise**2))
    return per_step.sum(0)


def _llr_own_scale(updates: np.ndarray, sample_rate: float) -> np.ndarray:
    """The same with each coordinate's own median as its zero and its own spread (1.4826 x
    the median absolute deviation) as its noise: blind to a noise value that repeats every
    step and sharp where the noise is smaller than claimed or missing."""
    centred = updates - np.median(updates, axis=0)
    spread = 1.4826 * np.median(np.abs(centred), axis=0)
    return _llr(centred, sample_rate, np.maximum(spread, MIN_SPREAD))


def _log_likelihoods(updates: np.ndarray, sample_rate: float, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood "in", "out") of each canary's updates [steps, canaries] at noise std ``noise``."""
    at_zero, at_one = stats.norm.logpdf(updates, 0.0, noise), stats.norm.logpdf(updates, 1.0, noise)
    with np.errstate(divide="ignore"):  # q = 1
        inside = np.logaddexp(np.log1p(-sample_rate) + at_zero, np.log(sample_rate) + at_one)
    return inside.sum(0), at_zero.sum(0)


def _llr_claimed_or_noiseless(updates: np.ndarray, sample_rate: float, noise: float) -> np.ndarray:
    """Generalised likelihood ratio over the noise scales {``noise``, MIN_SPREAD}: the claimed
    ratio on noisy coordinates, near-perfect on coordinates released without noise."""
    pairs = [_log_likelihoods(updates, sample_rate, scale) for scale in (noise, MIN_SPREAD)]
    return np.maximum(*(p[0] for p in pairs)) - np.maximum(*(p[1] for p in pairs))


class DiracCanaries:
    """White-box gradient canaries observed in every update."""

    name = "dirac"
    score_names = ("llr", "llr_own_scale", "llr_claimed_or_noiseless")

    def __init__(self, setting: Setting):
        self.setting = setting
        self.population = self._population(np.random.default_rng([setting.seed, 1]))

    def _population(self, rng: np.random.Generator) -> Tensor:
        """Random gradients [n, POPULATION_DIMS], norms spread around C (about half of them clipped)."""
        n, c = self.setting.population, self.setting.mechanism.max_grad_norm
        direction = rng.standard_normal((n, POPULATION_DIMS))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        norms = c * np.exp(rng.normal(0.0, 0.5, size=(n, 1)))
        return torch.tensor(direction * norms, dtype=torch.float32)

    def updates(self, slots_in: np.ndarray, observed: np.ndarray, seed: int) -> np.ndarray:
        """Train with canaries in ``slots_in``; the updates [steps, len(observed)] of the
        ``observed`` slots' coordinates, in units of C (a sampled canary adds exactly 1)."""
        s, m = self.setting, self.setting.mechanism
        count = len(slots_in)
        features = torch.cat([self.population, torch.zeros(count, POPULATION_DIMS)])
        slot = torch.cat([torch.zeros(len(self.population), dtype=torch.long),
                          torch.as_tensor(slots_in, dtype=torch.long)])
        value = torch.cat([torch.zeros(len(self.population)), torch.full((count,), NORM_RATIO * m.max_grad_norm)])
        dataset = tuple(t.to(s.device) for t in _shuffled((features, slot, value), seed))
        expected_batch = m.sample_rate * len(features)
        coordinates = torch.as_tensor(POPULATION_DIMS + observed, dtype=torch.long, device=s.device)
        updates, previous = [], torch.zeros(len(observed), dtype=torch.float64)  # DiracLoss starts at 0

        def observe(step: int, model: nn.Module) -> None:
            nonlocal previous
            current = model.probe.weight.detach()[0, coordinates].double().cpu()
            # the update in units of C: (clipped sum + noise) / B, times -lr, undone
            updates.append((previous - current).numpy() * expected_batch / (m.learning_rate * m.max_grad_norm))
            previous = current

        train_private(s.engine, DiracLoss(s.slots).to(s.device), dataset, m, seed, observe, s.sampler)
        return np.stack(updates)

    @staticmethod
    def scores(updates: np.ndarray, mechanism: Mechanism) -> np.ndarray:
        """Scores [score_names, canaries] of updates [steps, canaries] (units of C) under the claimed ``mechanism``."""
        sigma, q = max(mechanism.noise_multiplier, MIN_SPREAD), mechanism.sample_rate
        return np.stack([_llr(updates, q, sigma), _llr_own_scale(updates, q),
                         _llr_claimed_or_noiseless(updates, q, sigma)])

    def _train(self, slots_in: np.ndarray, observed: np.ndarray, seed: int) -> np.ndarray:
        """Scores [scores, len(observed)] of the ``observed`` slots, canaries in ``slots_in``."""
        return self.scores(self.updates(slots_in, observed, seed), self.setting.mechanism)

    def one_run(self, included: np.ndarray, seed: int) -> np.ndarray:
        """Scores [scores, m] of the m = slots canaries, those ``included`` trained on."""
        slots = np.arange(self.setting.slots)
        return self._train(slots[included], slots, seed)

    def many_runs_one(self, canary_in: bool, seed: int) -> np.ndarray:
        """Scores [scores] of one canary in a random slot, trained on or not."""
        slot = np.random.default_rng([seed, 1]).integers(self.setting.slots, size=1)
        return self._train(slot if canary_in else slot[:0], slot, seed)[:, 0]


class InputCanaries:
    """Black-box input canaries: crafted, mislabeled examples scored by the final model's loss."""

    name = "input"
    score_names = ("negative_loss",)

    def __init__(self, setting: Setting):
        self.setting = setting
        self.population = self._population(np.random.default_rng([setting.seed, 2]))

    def _population(self, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """CLASSES Gaussian clusters in the population coordinates: features [n, P], labels [n]."""
        n = self.setting.population
        centres = rng.standard_normal((CLASSES, POPULATION_DIMS))
        labels = rng.integers(CLASSES, size=n)
        x = centres[labels] + 0.5 * rng.standard_normal((n, POPULATION_DIMS))
        return torch.tensor(x, dtype=torch.float32), torch.tensor(labels, dtype=torch.long)

    def _train(self, slots: np.ndarray, labels: np.ndarray, included: np.ndarray, seed: int) -> np.ndarray:
        """Train with the canaries ``slots[included]``; scores [1, len(slots)] of all of them."""
        s, m = self.setting, self.setting.mechanism
        population, population_labels = self.population
        n, count = len(population), int(included.sum())
        expected_batch = m.sample_rate * (n + count)
        # one clipped step of the canary moves its own logits by about one nat
        scale = expected_batch / (m.learning_rate * m.max_grad_norm)
        canaries = (torch.zeros(len(slots), POPULATION_DIMS), torch.as_tensor(slots, dtype=torch.long),
                    torch.full((len(slots),), scale), torch.as_tensor(labels, dtype=torch.long))
        people = (population, torch.zeros(n, dtype=torch.long), torch.zeros(n), population_labels)
        chosen = torch.as_tensor(included)
        dataset = _shuffled(tuple(torch.cat([p, c[chosen]]) for p, c in zip(people, canaries)), seed)
        dataset = tuple(t.to(s.device) for t in dataset)
        model = train_private(s.engine, SoftmaxRegression(s.slots, CLASSES).to(s.device), dataset, m, seed,
                              sampler_factory=s.sampler)
        with torch.no_grad():
            loss = model(*(t.to(s.device) for t in canaries))
        return -loss.double().cpu().numpy()[None, :]

    def one_run(self, included: np.ndarray, seed: int) -> np.ndarray:
        """Scores [1, m] of the m = slots canaries (random labels), those ``included`` trained on."""
        slots = np.arange(self.setting.slots)
        labels = np.random.default_rng([seed, 1]).integers(CLASSES, size=len(slots))
        return self._train(slots, labels, included, seed)

    def many_runs_one(self, canary_in: bool, seed: int) -> np.ndarray:
        """Score [1] of one canary (random slot and label), trained on or not."""
        rng = np.random.default_rng([seed, 1])
        slot, label = rng.integers(self.setting.slots, size=1), rng.integers(CLASSES, size=1)
        return self._train(slot, label, np.array([canary_in]), seed)[:, 0]


CANARY_KINDS = {kind.name: kind for kind in (DiracCanaries, InputCanaries)}
