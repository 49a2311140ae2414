"""Every trainable parameter of DP-Cap and ViP is clipped correctly by the privacy
engine: its gradient equals (1/B) sum_i min(1, C / (||g_i|| + 1e-6)) g_i with g_i
the per-example gradients from torch.func on tiny variants of the models."""

import copy

import pytest
import torch
from torch.func import functional_call, grad

import models
from privacy.engine import PrivacyEngine

B = 4


def _per_example_grads(model, loss_of_one, inputs):
    """{name: [B, *shape]} from torch.func.grad of each example's loss alone.

    A loop over examples rather than vmap: DP-Cap's forward validates token ids
    with ``.item()``, which vmap cannot batch."""
    model = copy.deepcopy(model)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss(p, *one):
        return loss_of_one(lambda *args, **kw: functional_call(model, (p, buffers), args, kw), *one)

    grads = [grad(loss)(params, *(x[i : i + 1] for x in inputs)) for i in range(B)]
    return {n: torch.stack([g[n] for g in grads]) for n in params}


def _check_engine(model, per_example_loss, reference):
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in reference.values()))
    C = float(norms.median())  # some examples clipped, some not
    scale = (C / (norms + 1e-6)).clamp(max=1.0)
    assert (scale < 1).any() and (scale == 1).any()
    engine = PrivacyEngine(model, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=B, seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(engine.covered_parameters) == trainable
    engine.backward(per_example_loss())
    torch.testing.assert_close(engine.per_example_norms, norms, rtol=1e-4, atol=1e-6)
    engine.finish_step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            expected = torch.einsum("b,b...->...", scale, reference[name]) / B
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=name)
    engine.detach()


def test_dpcap_every_parameter_clipped():
    torch.manual_seed(0)
    model = models.create_model(
        "dpcap_nano", img_size=32, embed_dim=16, depth=2, num_heads=2, decoder_embed_dim=16,
        decoder_depth=2, decoder_num_heads=2, vocab_size=128, text_max_length=8,
    )
    images = torch.randn(B, 3, 32, 32)
    tokens = torch.randint(1, 128, (B, 8))
    tokens[:, 0] = 101
    for i, n in enumerate([3, 5, 8, 6]):  # different lengths: [CLS] ... [SEP] PAD...
        tokens[i, n - 1], tokens[i, n:] = 102, 0
    reference = _per_example_grads(model, lambda f, x, t: f(x, t).sum(), (images, tokens))
    _check_engine(model, lambda: model(images, tokens), reference)


def test_vip_every_parameter_clipped():
    torch.manual_seed(0)
    model = models.create_model(
        "vip_base", img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2,
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
    )
    assert all(p.requires_grad for p in model.parameters())
    images = torch.randn(B, 3, 32, 32)
    noise = torch.rand(B, 16)  # one fixed mask for the engine's run and the reference
    reference = _per_example_grads(model, lambda f, x, z: f(x, 0.75, noise=z).sum(), (images, noise))
    _check_engine(model, lambda: model(images, 0.75, noise=noise), reference)


@pytest.mark.parametrize("name", ["dpcap_base", "vip_base"])
def test_named_models_fully_covered(name):
    """Built on the meta device: every trainable parameter has an engine rule."""
    with torch.device("meta"):
        model = models.create_model(name)
    engine = PrivacyEngine(model, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=1, seed=0)
    assert set(engine.covered_parameters) == {n for n, p in model.named_parameters() if p.requires_grad}
    engine.detach()
