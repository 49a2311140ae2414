"""privacy.bench runs end to end and reports what it promises (no timing asserted)."""

import pytest
import torch

from privacy import bench
from privacy.engine import PrivacyEngine
from tests.privacy_helpers import clipped_mean, flat_norms, per_example_grads

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def test_bench_reports_both_steps_and_detaches():
    result = bench.main(["--model", "small", "--batch", "4", "--steps", "1", "--warmup", "0", "--device", "cpu"])
    assert result["non_private_examples_per_s"] > 0 and result["private_examples_per_s"] > 0
    ratio = result["private_examples_per_s"] / result["non_private_examples_per_s"]
    assert result["throughput_ratio"] == pytest.approx(ratio)
    assert result["memory_ratio"] is None  # CPU: not measured


def test_bench_vit_is_clipped_exactly():
    """The benchmarked model is made of supported layers only (no silent fallback)."""
    torch.manual_seed(0)
    config = bench.ViTConfig(img_size=8, patch=4, dim=16, depth=1, heads=2, classes=3)
    model = bench.ViT(config)
    images, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    reference = per_example_grads(model, images, labels)
    max_norm = flat_norms(reference).median().item()
    engine = PrivacyEngine(model, max_norm, 0.0, 3.0)
    engine.backward(model(images, labels))
    engine.finish_step()
    expected = clipped_mean(reference, max_norm, 3.0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-7)
