"""PrivacyEngine: DP-SGD gradients with exact per-example clipping, one backward.

Book-keeping clipping (Bu et al. 2023, "Differentially private optimization on
large model at small cost"). The engine composes three stages, each testable
alone:

1. install (``privacy/install.py``): a rule for every layer that owns
   trainable parameters, refusals of what no rule covers, each layer's
   ``forward`` swapped for a custom autograd Function which keeps the input
   activation, catches the output gradient, and returns a gradient for the
   input only, so autograd never forms the (unclipped) weight gradient; bare
   parameters watched (``privacy/bare.py``); :meth:`PrivacyEngine.detach`.
2. clipping (``privacy/clipping.py``): inside the backward, each layer's
   per-example norms as soon as its gradient arrives; after it, the clip
   factors (``clip_factors``, beside the proof of the bound: every example
   adds at most C in every dtype) and the clipped sums.
3. the step (``privacy/step.py``): ``finish_step`` reduces, adds noise once,
   scales by the expected batch size and assigns ``p.grad``.

Parameters are addressed as (module, attribute name) and read again when
needed, so FSDP2's swapping between sharded and unsharded parameters is
transparent. The noise seed is secret: whoever knows it can remove the noise.

Limits: activation checkpointing stays exact but saves no memory (the engine
keeps each layer's input from the first forward until the layer's backward);
torch.compile breaks the graph at every wrapped layer.
"""

import logging
import math

import torch
from torch import Tensor, nn

from privacy.clipping import Clipping, check_matmul_precision
from privacy.install import Installation, Target
from privacy.reducer import GradReducer, LocalReducer
from privacy.rules import DEFAULT_RULES, Rule
from privacy.rules.base import FP32, Context, LayerPlan
from privacy.seeds import draw_secret_seed
from privacy.step import NoiseGenerators, StepSums, add_noise, scale_grad

__all__ = ["PrivacyEngine", "check_matmul_precision"]

logger = logging.getLogger(__name__)




class PrivacyEngine:
    """Per-example clipping to ``max_grad_norm`` and Gaussian noise, for ``model``.

    Use::

        loss = model(batch)              # [b], one loss per example
        engine.backward(loss)            # any number of micro-batches
        stats = engine.finish_step()     # p.grad = (clipped sum + noise) / B
        optimizer.step(); engine.zero_grad()

    ``seed=None`` draws a fresh secret seed from ``os.urandom``; save it with
    :meth:`state_dict` to resume. The noise of step ``k`` comes from a
    generator seeded with (seed, reducer.noise_stream, k, device), so a resumed
    run never reuses noise and ranks with distinct streams are independent.

    ``two_pass=True`` runs the original DP-Cap algorithm instead, on the same
    rules: a backward for the norms, then a backward of ``sum_i c_i loss_i``
    whose (already clipped) weight gradients are summed in each layer's
    backward. For comparison only: it costs a second backward, and its bound
    holds only up to the rounding of that backward (exact in exact arithmetic;
    in bf16 the clipped gradient is rounded through the whole backward).

    ``reuse_memory``: a layer keeps its per-example gradients for the clipped
    sum (instead of its (activation, output gradient) pair) only where they take
    at most this multiple of the pair's bytes; 1.0 never lets the choice raise
    what the engine holds. :attr:`plan` shows each layer's choice.
    """

    def __init__(
        self,
        model: nn.Module,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        seed: int | None = None,
        reducer: GradReducer | None = None,
        *,
        rules: dict[type[nn.Module], Rule] | None = None,
        two_pass: bool = False,
        reuse_memory: float = 1.0,
    ):
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be a positive finite number, got {max_grad_norm}")
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if not expected_batch_size > 0:
            raise ValueError(f"expected_batch_size must be > 0 (the Poisson rate times the dataset size), "
                             f"got {expected_batch_size}")
        if seed is not None and not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        if not (reuse_memory >= 0 and math.isfinite(reuse_memory)):
            raise ValueError(f"reuse_memory must be a finite number >= 0, got {reuse_memory}")
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.reducer: GradReducer = reducer if reducer is not None else LocalReducer()
        self.rules = dict(DEFAULT_RULES if rules is None else rules)
        self.two_pass = bool(two_pass)
        self.reuse_memory = float(reuse_memory)
        self._seed = draw_secret_seed() if seed is None else seed
        self._step = 0
        self._install = Installation(model, self.rules)
        self._sums = StepSums(self._install.shapes)
        self._clipping = Clipping(self._install, self._sums, self.max_grad_norm)
        self.plan: dict[str, LayerPlan] = self._clipping.plan
        self._install.attach(self._clipping)
        logger.info("privacy engine clips %d parameter tensors: %d layers, %d modules' bare parameters",
                    len(self._install.clipped), len(self._install.targets), len(self._install.owners))

    @property
    def _targets(self) -> list[Target]:
        """The layers the engine wrapped (tests read their recorded calls)."""
        return self._install.targets

    @property
    def per_example_norms(self) -> Tensor:
        """fp32 [b]: the last micro-batch's per-example gradient norms (one per
        example, not per view)."""
        return self._clipping.per_example_norms

    def detach(self) -> None:
        """Restore every layer's own forward and drop all engine state."""
        self._install.detach()
        self._sums.clear()

    @property
    def covered_parameters(self) -> list[str]:
        """Qualified names of the trainable parameters the engine clips (all of them)."""
        return [qualified for _, _, qualified in self._install.clipped]

    @property
    def bare_parameters(self) -> list[str]:
        """Those of :attr:`covered_parameters` that no layer rule covers: used in
        their module's own forward code and handled by privacy/bare.py."""
        return [o.label(name) for o in self._install.owners for name in o.names]

    # -- one micro-batch ----------------------------------------------------

    def backward(self, per_example_loss: Tensor, views: int = 1) -> None:
        """Backward one micro-batch and add its clipped per-example gradients.

        ``views=K`` (augmentation multiplicity, De et al. 2022): ``per_example_loss``
        has ``b x K`` rows, rows ``i K .. i K + K - 1`` the losses of example i's K
        augmented views. The example's loss is the mean of its views' losses, so
        its gradient (the mean of its views' gradients) is clipped as one: the
        example still adds at most C, and the statistics count examples. That the
        rows come K per example is the caller's declaration (the loss is where
        the examples are defined); every layer's rows are then taken as K times
        the grouping privacy.graph proves relative to the loss's rows."""
        if not self._install.attached:
            raise ValueError("this PrivacyEngine was detached; create a new one")
        if per_example_loss.dim() != 1:
            raise ValueError(
                "per_example_loss must have shape [b] (one loss per example, not reduced), "
                f"got {tuple(per_example_loss.shape)}"
            )
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an int >= 1 (augmented views per example), got {views!r}")
        if per_example_loss.shape[0] % views:
            raise ValueError(f"per_example_loss has {per_example_loss.shape[0]} rows, not a multiple of views={views} "
                             "(rows i*views .. i*views + views - 1 are example i's views)")
        device = per_example_loss.device
        check_matmul_precision(device.type)
        self._install.drop_stale_calls()
        self._install.refuse_leaks(per_example_loss)
        loss = per_example_loss if views == 1 else per_example_loss.reshape(-1, views).mean(1)
        batch = loss.shape[0]
        clipping = self._clipping
        try:
            # an empty micro-batch still runs backward, so that every rank runs the
            # same hooks and collectives, but it has no per-example gradient to clip
            if self.two_pass and batch > 0:
                # the original algorithm's norm pass: ghost norms for every Linear (nothing kept for a sum)
                scale = clipping.run(loss, Context(device.type, batch, keep_sum=False, reuse_memory=0.0), views,
                                     retain=True)
                keep = (scale > 0).to(FP32)
                clipping.run(loss * scale.to(loss.dtype), Context(device.type, batch, norms=False), views, keep=keep)
            else:
                clipping.run(loss, Context(device.type, batch, reuse_memory=self.reuse_memory), views)
        finally:
            self._install.forget_forward()

    # -- the logical step ---------------------------------------------------

    @torch.no_grad()
    def finish_step(self) -> dict[str, float]:
        """Reduce, add noise once, divide by the expected batch, assign ``p.grad``
        (privacy/step.py), per parameter in that order."""
        if not self._install.attached:
            raise ValueError("this PrivacyEngine was detached; create a new one")
        std = self.noise_multiplier * self.max_grad_norm
        generators = NoiseGenerators(self._seed, self.reducer.noise_stream, self._step)
        for module, name, _ in self._install.clipped:
            param = getattr(module, name)
            local = self.reducer.reduce(param, self._sums.pop(module, name, param.device))
            noised = add_noise(local, std, generators)
            self.reducer.assign(param, scale_grad(noised, self.expected_batch_size, owned=noised is not local))
        self._step += 1
        return self._clipping.stats.pop(self._step)

    def zero_grad(self) -> None:
        """Set ``p.grad = None`` for every clipped parameter."""
        for module, name, _ in self._install.clipped:
            getattr(module, name).grad = None

    # -- checkpointing ------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """Step count and secret noise seed (keep checkpoints private)."""
        return {"step": self._step, "seed": self._seed, "noise_stream": self.reducer.noise_stream}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self._sums:
            raise ValueError("load_state_dict in the middle of a logical step; call it before any backward")
        missing = {"step", "seed"} - set(state)
        if missing:
            raise ValueError(f"engine state is missing {sorted(missing)}")
        self._step, self._seed = int(state["step"]), int(state["seed"])
        if state.get("noise_stream", self.reducer.noise_stream) != self.reducer.noise_stream:
            logger.info("noise stream changed on resume (%s -> %s)", state["noise_stream"], self.reducer.noise_stream)

    @property
    def step(self) -> int:
        """Number of finished logical steps."""
        return self._step
