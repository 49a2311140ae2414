"""TensorBoard event files written by a real run, read back."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from privacy.accounting import epsilon_of_segments
from privacy.sampling import PoissonSampler
from tests.helpers.jobs import run_worker
from tests.helpers.privacy import flat_norms, per_example_grads
from tests.helpers.standin import TinyCaptioner, tiny_config, tiny_data
from trainer.common.checkpoints import read_meta
from trainer.job.checkpointer import Checkpointer


def test_tensorboard_scalars(tmp_path):
    # C = 3: about the median per-example norm at initialisation (2.2 to 3.5)
    cfg = tiny_config(tmp_path, **{"privacy.noise_multiplier": 1.0, "privacy.max_grad_norm": 3.0, "steps": 6})
    run_worker(1, tmp_path, cfg, launcher="python")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/examples_per_s", "train/realised_batch",
                "privacy/epsilon_rdp", "privacy/epsilon_pld", "privacy/sigma", "privacy/q",
                "privacy/clip_fraction", "privacy/norm_p50_rank0", "privacy/norm_p90_rank0",
                "comm/bytes_per_step", "train/tflops_per_s", "data/skipped_samples_rank0"):
        assert tag in tags, (tag, sorted(tags))
    eps = {e.step: e.value for e in events.Scalars("privacy/epsilon_rdp")}
    assert sorted(eps) == [1, 2, 3, 4, 5, 6]
    for step, value in eps.items():
        assert value == pytest.approx(epsilon_of_segments([(1.0, 1 / 3, step)], 1e-3, "rdp"), rel=1e-5)
    assert sorted(e.step for e in events.Scalars("privacy/epsilon_pld")) == [3, 6]
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] == pytest.approx(0.025) and lrs[1] == pytest.approx(0.05) and lrs[-1] < lrs[1]
    # step 1's clip fraction and largest norm, from torch.func per-example gradients at the
    # initial parameters of the examples the step drew (the run's secret sampling seed)
    torch.manual_seed(cfg["seed"])
    images, tokens = map(torch.stack, zip(*tiny_data(96)))
    norms = flat_norms(per_example_grads(TinyCaptioner(), images, tokens))
    seed = read_meta(Checkpointer(tmp_path / "ckpt", 2, 0).latest())["train_state"]["sampling_seed"]
    drawn = [i for micro in PoissonSampler(96, 1 / 3, seed, max_physical_batch=8).step_batches(0) for i in micro]
    clipped = (norms[drawn] > 3.0).float().mean().item()
    assert 0 < clipped < 1, clipped  # both kinds of example, so a constant would fail
    assert events.Scalars("privacy/clip_fraction")[0].value == pytest.approx(clipped, abs=1e-6)
    assert events.Scalars("privacy/norm_max_rank0")[0].value == pytest.approx(norms[drawn].max().item(), rel=1e-4)
    assert all(20 <= e.value <= 45 for e in events.Scalars("train/realised_batch"))  # Poisson around 32
    assert all(e.value == 0 for e in events.Scalars("data/skipped_samples_rank0"))

    # achieved training FLOP rate = the model's FLOPs per example x examples per second
    from torch.utils.flop_counter import FlopCounterMode

    images, tokens = map(torch.stack, zip(*tiny_data(1)))
    with FlopCounterMode(display=False) as counter:
        TinyCaptioner()(images, tokens).sum().backward()
    rates = [e.value for e in events.Scalars("train/tflops_per_s")]
    per_s = [e.value for e in events.Scalars("train/examples_per_s")]
    assert counter.get_total_flops() > 0 and len(rates) == len(per_s) == 6
    for rate, examples in zip(rates, per_s):
        assert rate == pytest.approx(counter.get_total_flops() * examples / 1e12, rel=1e-4)
